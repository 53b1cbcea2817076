"""Write a run as a Hugging Face model directory that `AutoModelForCausalLM.from_pretrained` loads.

`python -m lmobjective.export --workdir=W [--step=N] --out=DIR [--max_shard_size=BYTES]` writes
config.json (GPT-2, Llama, Qwen2 or Qwen3: whichever computes what `config.model` does, else refused in
one line naming the key), model.safetensors (float32, or shards and model.safetensors.index.json above
`max_shard_size`), generation_config.json, and tokenizer.json when the run's tokenizer is one
(`data.tokenizer.kind=hf`); other tokenizers have no `tokenizer.json` form here, which is said in one
line. Each tensor is the exact inverse of the import (`keymap.Group.to_hf`): import -> export is
bit-identical.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from lmobjective import files
from lmobjective.hf import keymap
from lmobjective.hf.configs import HFError
from lmobjective.hf.safetensors_dir import INDEX, SINGLE

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _refuse(key: str, value, why: str):
  raise HFError(f"config.model.{key}={value!r}: {why}; no Hugging Face architecture here computes it")


def family_of(cfg) -> str:
  """The HF family that computes what the resolved model `cfg` does."""
  if cfg.position == "learned":
    for key, want in (("norm", "layernorm"), ("mlp", "gelu"), ("use_bias", True), ("tie_embeddings", True),
                      ("qk_norm", False), ("attention_bias", "none"), ("mlp_bias", False)):
      if getattr(cfg, key) != want:
        _refuse(key, getattr(cfg, key), f"GPT-2 (learned positions) needs {want!r}")
    if cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.embed_dim:
      _refuse("num_kv_heads", cfg.num_kv_heads, "GPT-2 needs num_kv_heads = num_heads and head_dim = embed_dim/num_heads")
    return "gpt2"
  for key, want in (("norm", "rmsnorm"), ("mlp", "swiglu"), ("use_bias", False)):
    if getattr(cfg, key) != want:
      _refuse(key, getattr(cfg, key), f"the Llama family (rope) needs {want!r}")
  if cfg.qk_norm:
    if cfg.mlp_bias:
      _refuse("mlp_bias", True, "Qwen3 (qk_norm) has no MLP biases")
    return "qwen3"
  if cfg.attention_bias == "qkv":
    if cfg.mlp_bias:
      _refuse("mlp_bias", True, "Qwen2 (q/k/v biases) has no MLP biases")
    return "qwen2"
  return "llama"


def hf_config(cfg, family: str, bos_id: int | None, eos_id: int | None) -> dict:
  """config.json for the resolved model `cfg` as `family` (transformers 5's field names)."""
  vocab = cfg.vocab_limit or cfg.vocab_size
  common = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": vocab,
            "bos_token_id": bos_id, "eos_token_id": eos_id, "tie_word_embeddings": cfg.tie_embeddings,
            "dtype": "float32", "use_cache": True}
  if family == "gpt2":
    return {**common, "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_embd": cfg.embed_dim,
            "n_inner": cfg.mlp_dim, "n_positions": cfg.max_len, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
  out = {**common, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
         "num_key_value_heads": cfg.num_kv_heads, "hidden_size": cfg.embed_dim, "head_dim": cfg.head_dim,
         "intermediate_size": cfg.mlp_dim, "max_position_embeddings": cfg.max_len, "hidden_act": "silu",
         "rms_norm_eps": cfg.norm_eps, "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
         "attention_dropout": 0.0}
  if family in ("llama", "qwen3"):
    out["attention_bias"] = cfg.attention_bias == "qkvo"
  if family == "llama":
    out["mlp_bias"] = cfg.mlp_bias
  if family in ("qwen2", "qwen3"):
    out.update(use_sliding_window=False, sliding_window=None)
  return out


def _groups(cfg, family: str, hf_vocab: int) -> list[keymap.Group]:
  if family == "gpt2":
    return keymap.gpt2(cfg, hf_vocab)
  return keymap.llama(cfg, hf_vocab, cfg.attention_bias, cfg.mlp_bias)


def tensors(params: dict, cfg, family: str, shapes_only: bool = False):
  """(HF key, host array) of every tensor, in the key map's order, one group at a time (`shapes_only`:
  (HF key, ShapeDtypeStruct), nothing computed)."""
  hf_vocab = cfg.vocab_limit or cfg.vocab_size
  for g, layer, keys in keymap.expand(_groups(cfg, family, hf_vocab), cfg.num_layers):
    ours = []
    for p in g.ours:
      leaf = params
      for part in (keymap.layer_path(cfg, layer, p) if layer is not None else p):
        leaf = leaf[part]
      ours.append(leaf[layer] if layer is not None and cfg.scan_layers else leaf)
    if shapes_only:
      yield from zip(keys, jax.eval_shape(g.to_hf, *ours))
      continue
    for key, array in zip(keys, jax.jit(g.to_hf)(*ours)):
      yield key, np.asarray(jax.device_get(array))


def write(params: dict, cfg, out: str, *, bos_id: int | None, eos_id: int | None, family: str | None = None,
          tokenizer_json: str | None = None, max_shard_size: int = 2 << 30) -> list[str]:
  """Writes the HF directory `out` (atomically: a temp dir renamed into place); returns the files written."""
  if os.path.exists(out):
    raise HFError(f"{out}: exists; export writes a new directory")
  family = family or family_of(cfg)
  config = hf_config(cfg, family, bos_id, eos_id)
  sizes = [(k, int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize)
           for k, s in tensors(params, cfg, family, shapes_only=True)]
  shards, size = [[]], 0  # planned from the shapes: the host holds one shard's tensors at a time
  for key, nbytes in sizes:
    if shards[-1] and size + nbytes > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].append(key)
    size += nbytes
  from safetensors.numpy import save_file
  with files.atomic_path(out, directory=True) as tmp:
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                for i in range(len(shards))]
    arrays = tensors(params, cfg, family)
    for name, keys in zip(names, shards):
      save_file(dict(next(arrays) for _ in keys), os.path.join(tmp, name), metadata={"format": "pt"})
    if len(shards) > 1:
      index = {"metadata": {"total_size": sum(n for _, n in sizes)},
               "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
      with open(os.path.join(tmp, INDEX), "w") as f:
        json.dump(index, f, indent=2)
      names.append(INDEX)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump({"bos_token_id": bos_id, "eos_token_id": eos_id}, f, indent=2)
    names += ["config.json", "generation_config.json"]
    if tokenizer_json is not None:
      with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tokenizer_json)
      names.append("tokenizer.json")
  return names
