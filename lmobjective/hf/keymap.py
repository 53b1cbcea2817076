"""Hugging Face safetensors keys <-> this model's params, as groups of tensors with their two maps.

A `Group` ties some HF tensors (in their own layouts) to some params (in this model's): GPT-2's fused
`c_attn.weight` [D,3D] is one HF tensor for three params (query, key, value [D,N,H]); Llama's
`q_proj.weight` [N·H,D] is one for one (transposed, reshaped). `to_ours` and `to_hf` are jnp functions,
exact inverses (reshapes and transposes only: import -> export is bit-identical). Layouts follow
transformers' own files: GPT-2's Conv1D stores [in,out] (no transpose), the Llama family's Linear [out,in]
(transposed). RoPE needs no permutation: this model rotates halves, as transformers' Llama does
(`model.apply_rope`).

Most groups are one HF tensor for one param, and for those `slice_map` also says how each device's slice
of the param comes from a slice of the tensor (our index -> (the HF index to read, a NumPy function of
that slice)): the import then reads and transforms each device's slice on the host, straight onto the
param's sharding (`load.load`), and never holds the tensor in its HF layout on the devices.

Param paths are tuples within a block (`("attn", "query", "kernel")`) for per-layer groups, from the
top of the params tree otherwise; `layer_path` places a block's path in the tree (`block_{i}`, or the
stacked `blocks` of `model.scan_layers`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

Path = tuple[str, ...]
Ranges = tuple[tuple[int, int], ...]  # [start, stop) per dimension
SliceMap = Callable[[Ranges], "tuple[tuple[slice, ...], Callable[[np.ndarray], np.ndarray]] | None"]
# HF tensors that are buffers, not parameters (older GPT-2 files; older Llama files' rotary cache)
SKIPPED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class Group:
  hf: tuple[str, ...]  # HF keys (for a per-layer group, with "{i}" for the layer)
  ours: tuple[Path, ...]
  to_ours: Callable  # (*hf arrays) -> tuple of our arrays
  to_hf: Callable  # (*our arrays) -> tuple of hf arrays
  per_layer: bool
  slice_map: SliceMap | None = None  # one tensor, one param: our slice -> (HF slice, its transform); None: not a block


def _one(hf: str, ours: Path, to_ours=None, to_hf=lambda x: x, per_layer: bool = True,
         slice_map: SliceMap | None = None) -> Group:
  if to_ours is None:  # the identity: each slice is the same slice
    to_ours, slice_map = (lambda x: x), (lambda r: (tuple(slice(a, b) for a, b in r), lambda w: w))
  return Group((hf,), (ours,), lambda x: (to_ours(x),), lambda x: (to_hf(x),), per_layer, slice_map)


def flat_range(ranges: Ranges, dims: tuple[int, ...]) -> tuple[int, int] | None:
  """The [start, stop) of a block of a row-major array of shape `dims` in its flattening, or None when
  the block is not contiguous there (a dimension split before the last one that is not taken whole)."""
  partial = [i for i, ((a, b), n) in enumerate(zip(ranges, dims)) if (a, b) != (0, n)]
  if not partial:
    return 0, _prod(dims)
  j = partial[-1]
  if any(b - a != 1 for a, b in ranges[:j]):
    return None
  start = sum(a * _prod(dims[i + 1:]) for i, (a, _) in enumerate(ranges[:j + 1]))
  return start, start + (ranges[j][1] - ranges[j][0]) * _prod(dims[j + 1:])


def _linear(hf: str, ours: Path, in_shape: tuple[int, ...], out_shape: tuple[int, ...], transpose: bool) -> Group:
  """An HF matrix ([out,in] if `transpose`, as torch's Linear; [in,out] as GPT-2's Conv1D) as our kernel
  [*in_shape, *out_shape] (e.g. [D,N,H] or [N,H,D])."""
  n_in = len(in_shape)
  full = in_shape + out_shape

  def to_ours(w):
    return (w.T if transpose else w).reshape(full)

  def to_hf(k):
    m = k.reshape(int(_prod(full[:n_in])), int(_prod(full[n_in:])))
    return m.T if transpose else m

  def slice_map(r: Ranges):
    fin, fout = flat_range(r[:n_in], in_shape), flat_range(r[n_in:], out_shape)
    if fin is None or fout is None:
      return None
    shard = tuple(b - a for a, b in r)
    if transpose:
      return (slice(*fout), slice(*fin)), lambda w: w.T.reshape(shard)
    return (slice(*fin), slice(*fout)), lambda w: w.reshape(shard)
  return _one(hf, ours, to_ours, to_hf, slice_map=slice_map)


def _prod(xs) -> int:
  out = 1
  for x in xs:
    out *= x
  return out


def _vector(hf: str, ours: Path, shape: tuple[int, ...], per_layer: bool = True) -> Group:
  size = _prod(shape)

  def slice_map(r: Ranges):
    flat = flat_range(r, shape)
    return None if flat is None else ((slice(*flat),), lambda b: b.reshape(tuple(e - a for a, e in r)))
  return _one(hf, ours, lambda b: b.reshape(shape), lambda b: b.reshape(size), per_layer, slice_map)


def _embedding(hf: str, ours: Path, rows: int, hf_rows: int, transpose: bool = False) -> Group:
  """An HF [V_hf, D] table as ours ([V, D], or the head's [D, V] if `transpose`), zero rows past V_hf when
  this model pads its vocabulary (their logits are -inf: `Transformer.head`); export slices them off."""
  def to_ours(w):
    w = jnp.pad(w, ((0, rows - hf_rows), (0, 0))) if rows > hf_rows else w
    return w.T if transpose else w

  def to_hf(w):
    return (w.T if transpose else w)[:hf_rows]

  def slice_map(r: Ranges):
    (v0, v1), (d0, d1) = (r[1], r[0]) if transpose else r
    stored = max(min(v1, hf_rows), v0)  # rows [v0, stored) are in the file, the rest are padding

    def fn(w):
      if stored < v1:
        w = np.concatenate([w, np.zeros((v1 - stored, d1 - d0), w.dtype)])
      return w.T if transpose else w
    return (slice(v0, stored), slice(d0, d1)), fn
  return _one(hf, ours, to_ours, to_hf, per_layer=False, slice_map=slice_map)


def gpt2(cfg, hf_vocab: int, prefix: str = "transformer.") -> list[Group]:
  D, N, H, F = cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  h, groups = prefix + "h.{i}.", []
  for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
    groups += [_one(f"{h}{ln}.weight", (norm, "scale")), _one(f"{h}{ln}.bias", (norm, "bias"))]
  qkv = tuple(("attn", name, "kernel") for name in ("query", "key", "value"))
  qkv_bias = tuple(("attn", name, "bias") for name in ("query", "key", "value"))
  groups.append(Group((f"{h}attn.c_attn.weight",), qkv,
                      lambda w: tuple(w.reshape(D, 3, N, H)[:, j] for j in range(3)),
                      lambda q, k, v: (jnp.stack([q, k, v], axis=1).reshape(D, 3 * N * H),), True))
  groups.append(Group((f"{h}attn.c_attn.bias",), qkv_bias,
                      lambda b: tuple(b.reshape(3, N, H)[j] for j in range(3)),
                      lambda q, k, v: (jnp.stack([q, k, v]).reshape(3 * N * H),), True))
  groups += [
      _linear(f"{h}attn.c_proj.weight", ("attn", "out", "kernel"), (N, H), (D,), transpose=False),
      _one(f"{h}attn.c_proj.bias", ("attn", "out", "bias")),
      _linear(f"{h}mlp.c_fc.weight", ("mlp", "up", "kernel"), (D,), (F,), transpose=False),
      _one(f"{h}mlp.c_fc.bias", ("mlp", "up", "bias")),
      _linear(f"{h}mlp.c_proj.weight", ("mlp", "down", "kernel"), (F,), (D,), transpose=False),
      _one(f"{h}mlp.c_proj.bias", ("mlp", "down", "bias")),
      _embedding(f"{prefix}wte.weight", ("token_embed", "embedding"), cfg.vocab_size, hf_vocab),
      _one(f"{prefix}wpe.weight", ("position_embed", "embedding"), per_layer=False),
      _one(f"{prefix}ln_f.weight", ("final_norm", "scale"), per_layer=False),
      _one(f"{prefix}ln_f.bias", ("final_norm", "bias"), per_layer=False),
  ]
  if not cfg.tie_embeddings:
    groups.append(_embedding("lm_head.weight", ("lm_head", "kernel"), cfg.vocab_size, hf_vocab, transpose=True))
  return groups


def llama(cfg, hf_vocab: int, attention_bias: str, mlp_bias: bool) -> list[Group]:
  """Llama, Mistral, Qwen2 (q/k/v biases: attention_bias "qkv"), Qwen3 (q/k norms: cfg.qk_norm)."""
  D, N, K, H, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  a, m = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
  groups = [_one("model.layers.{i}.input_layernorm.weight", ("attn_norm", "scale")),
            _one("model.layers.{i}.post_attention_layernorm.weight", ("mlp_norm", "scale"))]
  for name, proj, heads in (("query", "q_proj", N), ("key", "k_proj", K), ("value", "v_proj", K)):
    groups.append(_linear(f"{a}{proj}.weight", ("attn", name, "kernel"), (D,), (heads, H), transpose=True))
    if attention_bias in ("qkv", "qkvo"):
      groups.append(_vector(f"{a}{proj}.bias", ("attn", name, "bias"), (heads, H)))
  groups.append(_linear(f"{a}o_proj.weight", ("attn", "out", "kernel"), (N, H), (D,), transpose=True))
  if attention_bias == "qkvo":
    groups.append(_one(f"{a}o_proj.bias", ("attn", "out", "bias")))
  if cfg.qk_norm:
    groups += [_one(f"{a}q_norm.weight", ("attn", "query_norm", "scale")),
               _one(f"{a}k_norm.weight", ("attn", "key_norm", "scale"))]
  for name, proj, shape in (("gate", "gate_proj", ((D,), (F,))), ("up", "up_proj", ((D,), (F,))),
                            ("down", "down_proj", ((F,), (D,)))):
    groups.append(_linear(f"{m}{proj}.weight", ("mlp", name, "kernel"), *shape, transpose=True))
    if mlp_bias:
      groups.append(_one(f"{m}{proj}.bias", ("mlp", name, "bias")))
  groups += [_embedding("model.embed_tokens.weight", ("token_embed", "embedding"), cfg.vocab_size, hf_vocab),
             _one("model.norm.weight", ("final_norm", "scale"), per_layer=False)]
  if not cfg.tie_embeddings:
    groups.append(_embedding("lm_head.weight", ("lm_head", "kernel"), cfg.vocab_size, hf_vocab, transpose=True))
  return groups


def layer_path(cfg, i: int, path: Path) -> Path:
  """Where a block's param `path` of layer i sits in the params tree (scan_layers: `blocks`, index i of axis 0)."""
  return ("blocks",) + path if cfg.scan_layers else (f"block_{i}",) + path


def expand(groups: list[Group], num_layers: int) -> list[tuple[Group, int | None, tuple[str, ...]]]:
  """(group, layer or None, its HF keys with the layer filled in) for every group and layer."""
  out = []
  for g in groups:
    for i in (range(num_layers) if g.per_layer else (None,)):
      out.append((g, i, tuple(k.format(i=i) for k in g.hf)))
  return out
