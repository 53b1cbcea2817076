"""A Hugging Face `config.json` as `config.model` keys, and back.

Families: GPT-2 (learned positions, LayerNorm, tanh-GELU, biases, tied head) and the Llama family
(Llama, Mistral, Qwen2, Qwen3: RoPE, RMSNorm, SwiGLU, grouped-query attention). A field the model
cannot represent is refused in one line naming it (`HFError`), never silently dropped: an unknown
`rope_type`, an active sliding window, another activation, GPT-2's attention-scaling variants.
"""

from __future__ import annotations

import json
import os
from typing import Any


class HFError(ValueError):
  """A Hugging Face directory or field the importer cannot take; one line naming the file and field."""


LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
FAMILIES = ("gpt2",) + LLAMA_FAMILY
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all three are tanh-GELU
# Llama-family fields that must hold their default value: what this model computes assumes it
_LLAMA_MUST = {"hidden_act": "silu", "pretraining_tp": 1, "attn_logit_softcapping": None,
               "final_logit_softcapping": None}
_GPT2_MUST = {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
              "scale_attn_weights": True, "add_cross_attention": False}


def read(path: str) -> dict:
  """`path/config.json` as a dict; refuses a directory without one."""
  file = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise HFError(f"hf:{path}: not a directory")
  if not os.path.isfile(file):
    raise HFError(f"hf:{path}: no config.json (a Hugging Face model directory has config.json and "
                  "model.safetensors or model.safetensors.index.json)")
  try:
    with open(file) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise HFError(f"{file}: not JSON ({e})") from None


def family(hf: dict, file: str) -> str:
  kind = hf.get("model_type")
  if kind not in FAMILIES:
    archs = hf.get("architectures")
    raise HFError(f"{file}: model_type={kind!r} (architectures {archs}) is not supported; supported: "
                  f"{', '.join(FAMILIES)}")
  return kind


def _refuse(file: str, field: str, value: Any, why: str):
  raise HFError(f"{file}: {field}={value!r}: {why}")


def rope_theta(hf: dict, file: str) -> float:
  """RoPE's base from either form: `rope_parameters: {rope_theta, rope_type}` (what transformers 5 writes)
  or top-level `rope_theta` + `rope_scaling` (older files). Only the unscaled rotation is implemented."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for where, d in (("rope_parameters", params), ("rope_scaling", scaling)):
    kind = d.get("rope_type", d.get("type", "default"))
    if kind != "default":
      _refuse(file, f"{where}.rope_type", kind, "only the default (unscaled) RoPE is implemented")
  if hf.get("partial_rotary_factor", 1.0) != 1.0 or params.get("partial_rotary_factor", 1.0) != 1.0:
    _refuse(file, "partial_rotary_factor", hf.get("partial_rotary_factor", params.get("partial_rotary_factor")),
            "only full-dimension RoPE is implemented")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _sliding_window(hf: dict, kind: str, file: str, context_length: int | None) -> None:
  """Refuses a sliding window that would act: shorter than the context it runs at (or than
  max_position_embeddings when none is given). Qwen's `use_sliding_window`/`layer_types` too."""
  longest = context_length or hf.get("max_position_embeddings")
  if kind in ("qwen2", "qwen3"):
    layers = hf.get("layer_types") or []
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in layers):
      if hf.get("sliding_window") is not None and longest is not None and hf["sliding_window"] >= longest:
        return
      _refuse(file, "use_sliding_window", hf.get("use_sliding_window"), "sliding-window attention is not implemented")
    return
  window = hf.get("sliding_window")
  if window is not None and (longest is None or window < longest):
    _refuse(file, "sliding_window", window, f"shorter than the context ({longest}): sliding-window attention is not "
            "implemented")


def model_keys(hf: dict, file: str, context_length: int | None = None) -> dict[str, Any]:
  """The `config.model` keys that compute what `hf` (a config.json dict) describes."""
  kind = family(hf, file)
  if kind == "gpt2":
    return _gpt2(hf, file)
  for field, want in _LLAMA_MUST.items():
    if hf.get(field, want) != want:
      _refuse(file, field, hf[field], f"only {want!r} is implemented")
  _sliding_window(hf, kind, file, context_length)
  D, N = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or D // N
  attention_bias = bool(hf.get("attention_bias", False))
  return {
      "num_layers": hf["num_hidden_layers"], "num_heads": N, "num_kv_heads": hf.get("num_key_value_heads") or N,
      "embed_dim": D, "head_dim": head_dim, "mlp_dim": hf["intermediate_size"],
      "max_len": hf.get("max_position_embeddings"), "vocab_size": hf["vocab_size"],
      "position": "rope", "rope_theta": rope_theta(hf, file), "norm": "rmsnorm",
      "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "mlp": "swiglu", "qk_norm": kind == "qwen3",
      "use_bias": False,
      # Qwen2: q/k/v biases, none on o_proj; Llama's (and Qwen3's) attention_bias covers o_proj too
      "attention_bias": "qkv" if kind == "qwen2" else ("qkvo" if attention_bias else "none"),
      "mlp_bias": bool(hf.get("mlp_bias", False)),
      "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
  }


def _gpt2(hf: dict, file: str) -> dict[str, Any]:
  act = hf.get("activation_function", "gelu_new")
  if act not in GPT2_ACTIVATIONS:
    _refuse(file, "activation_function", act, f"only tanh-GELU ({', '.join(GPT2_ACTIVATIONS)}) is implemented")
  for field, want in _GPT2_MUST.items():
    if hf.get(field, want) != want:
      _refuse(file, field, hf[field], f"only {want!r} is implemented")
  D = hf["n_embd"]
  return {
      "num_layers": hf["n_layer"], "num_heads": hf["n_head"], "num_kv_heads": None, "embed_dim": D,
      "head_dim": None, "mlp_dim": hf.get("n_inner") or 4 * D, "max_len": hf["n_positions"],
      "vocab_size": hf["vocab_size"], "position": "learned", "norm": "layernorm",
      "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)), "mlp": "gelu", "qk_norm": False, "use_bias": True,
      "attention_bias": "none", "mlp_bias": False, "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
  }


def special_ids(hf: dict) -> dict[str, int | None]:
  """BOS/EOS ids as config.json says (tokenizer.json does not say which is which). A list of EOS ids
  (Llama 3 instruct) gives its first as the document separator; all of them stop sampling."""
  eos = hf.get("eos_token_id")
  return {"bos": hf.get("bos_token_id"), "eos": eos[0] if isinstance(eos, list) else eos}
