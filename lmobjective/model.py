"""Decoder-only causal transformer (Flax Linen). Returns logits; the objective lives in `objective.py`.

Shape legend: B batch, T tokens (context), D embed, N query heads, K key/value heads,
H head dim, F MLP hidden, V vocabulary, L layers.

Two families from one module, chosen by config: GPT-2 style (learned positions, LayerNorm,
GELU MLP, biases) and modern (RoPE, RMSNorm, SwiGLU, grouped-query attention), plus two recipe
switches (QK-norm, a relu(x)^2 MLP). Parameters
carry logical axis names (`embed`, `heads`, `mlp`, `vocab`, ...) so a mesh can shard them;
without axis rules the names are inert.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmobjective import config as config_lib
from lmobjective.config import ModelSection

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's resolved shape and numerics. No defaults: build it with `from_config` (from
  `config.model` of configs/default.py), or `dataclasses.replace` an existing one."""
  vocab_size: int
  vocab_limit: int | None  # the tokenizer's vocabulary when vocab_size pads beyond it; else None
  num_layers: int
  num_heads: int
  num_kv_heads: int
  embed_dim: int
  head_dim: int
  mlp_dim: int
  max_len: int
  position: str
  rope_theta: float
  norm: str
  norm_eps: float
  mlp: str
  qk_norm: bool
  use_bias: bool  # every projection and LayerNorm (GPT-2)
  attention_bias: str  # none | qkv | qkvo: biases on those projections only (Qwen2, Llama's attention_bias)
  mlp_bias: bool  # the MLP's projections only (Llama's mlp_bias)
  tie_embeddings: bool
  dropout: float
  init_std: float
  param_dtype: Any
  compute_dtype: Any
  attention: str
  remat: str
  scan_layers: bool

  @classmethod
  def from_config(cls, m: ModelSection, vocab_size: int,
                  context_length: int | None = None) -> "ModelConfig":
    """Resolves defaults (kv heads, MLP width, vocabulary, max_len = context_length) from `config.model`.

    `vocab_size` is the tokenizer's. A larger `model.vocab_size` pads the embedding and the head
    (for a mesh's tensor axis, or speed); the padded ids get `vocab_limit` (see `Transformer.head`).
    """
    padded = m.vocab_size or vocab_size
    return cls(
        vocab_size=padded, vocab_limit=vocab_size if padded > vocab_size else None, num_layers=m.num_layers, num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads or m.num_heads, embed_dim=m.embed_dim,
        head_dim=m.head_dim or m.embed_dim // m.num_heads, mlp_dim=config_lib.mlp_dim(m),
        max_len=m.max_len if m.max_len is not None else context_length, position=m.position,
        rope_theta=m.rope_theta, norm=m.norm, norm_eps=config_lib.norm_eps(m), mlp=m.mlp, qk_norm=m.qk_norm,
        use_bias=m.use_bias, attention_bias=m.attention_bias, mlp_bias=m.mlp_bias,
        tie_embeddings=m.tie_embeddings, dropout=m.dropout, init_std=m.init_std,
        param_dtype=DTYPES[m.param_dtype], compute_dtype=DTYPES[m.compute_dtype],
        attention=m.attention, remat=m.remat, scan_layers=m.scan_layers)


def _init(std: float, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


class Projection(nn.Module):
  """Linear map contracting the last `len(in_axes)` dims of x into `features` dims.

  The kernel is created in its true shape (e.g. [D, N, H]) so its logical axis names apply;
  flax's DenseGeneral initialises a flattened 2-D kernel, which breaks 3-D names under a mesh.
  """
  cfg: ModelConfig
  features: tuple[int, ...]
  axes: tuple[str | None, ...]  # logical names: input dims then output dims
  std: float
  bias: bool = False

  @nn.compact
  def __call__(self, x):
    cfg, n_in = self.cfg, len(self.axes) - len(self.features)
    shape = x.shape[-n_in:] + self.features
    kernel = self.param("kernel", _init(self.std, self.axes), shape, cfg.param_dtype)
    x, kernel = x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype)
    # As one 2-D matmul [rows, in] @ [in, out]: XLA:CPU runs the weight-gradient dot of a batched
    # tensordot (contracting batch and time together) several times slower (bench_nanogpt.py).
    lead, k_in = x.shape[:x.ndim - n_in], kernel.shape[:n_in]
    x2 = x.reshape(-1, int(np.prod(k_in)))
    y = (x2 @ kernel.reshape(x2.shape[1], -1)).reshape(lead + self.features)
    if self.bias:
      bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[n_in:])
      y = y + self.param("bias", bias_init, self.features, cfg.param_dtype).astype(cfg.compute_dtype)
    return y


class Embed(nn.Embed):
  """`nn.Embed` whose lookup reads the table gathered over `fsdp`, as FSDP uses every weight.

  Without this, GSPMD gathers rows from a table split along D over `fsdp` and then cannot turn
  the result (embed-sharded) into the batch-sharded activation the backbone declares: it
  replicates the whole [B,T,D] tensor ("involuntary full rematerialization"). Gathering the
  table first is one all-gather of V*D/tensor; the vocabulary stays split over `tensor`
  (Megatron's vocab-parallel lookup: a masked gather and an all-reduce).
  """
  lookup_axes: tuple[str | None, ...] = ("vocab", None)

  def __call__(self, inputs):
    (embedding,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
    return jnp.take(nn.with_logical_constraint(embedding, self.lookup_axes), inputs, axis=0)


def _dense(cfg: ModelConfig, features, axes, std, name, bias: bool = False) -> nn.Module:
  """A projection; with a bias if `bias` or `cfg.use_bias` (biases everywhere)."""
  features = features if isinstance(features, tuple) else (features,)
  return Projection(cfg, features, axes, std, bias=bias or cfg.use_bias, name=name)


def _norm(cfg: ModelConfig, name: str) -> nn.Module:
  scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
  if cfg.norm == "rmsnorm":
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
                      scale_init=scale_init, name=name)
  return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
                      use_bias=cfg.use_bias, scale_init=scale_init,
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                      name=name)


def _head_norm(cfg: ModelConfig, name: str) -> nn.Module:
  """RMSNorm of each head's vector (over head_dim), one learned scale per head_dim channel: QK-norm. Its
  epsilon is the blocks' own under rmsnorm (Qwen3, OLMo 2), 1e-6 under layernorm."""
  scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("head_dim",))
  eps = cfg.norm_eps if cfg.norm == "rmsnorm" else 1e-6
  return nn.RMSNorm(epsilon=eps, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
                    scale_init=scale_init, name=name)


def apply_rope(x_BxTxNxH: Array, positions_BxT: Array, theta: float) -> Array:
  """Rotary position embedding (rotate-half form), computed in float32."""
  half = x_BxTxNxH.shape[-1] // 2
  freq_h = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxTxh = positions_BxT[..., None].astype(jnp.float32) * freq_h
  sin, cos = jnp.sin(angle_BxTxh)[:, :, None, :], jnp.cos(angle_BxTxh)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def attention_mask(segment_ids_BxT: Array | None) -> Array | None:
  """Boolean [B,1,T,T] document mask: query and key in the same segment (causality is added apart).

  Padding (segment 0) attends only to padding, so no query row is ever empty.
  """
  if segment_ids_BxT is None:
    return None
  return segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]


def _attention_impl(cfg: ModelConfig) -> str:
  if cfg.attention != "auto":
    return cfg.attention
  on_gpu = jax.default_backend() == "gpu"
  cudnn_ok = cfg.compute_dtype == jnp.bfloat16 and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128
  return "cudnn" if on_gpu and cudnn_ok else "xla"


# The cache's layouts are the ones decoding's two matmuls read without a transpose (XLA:CPU otherwise
# copies the whole cache of every layer at every new token): keys [B,K,H,M] for q.k (contracting H),
# values [B,K,M,H] for p.v (contracting M). Logical names, for sharding the cache like the weights:
CACHE_AXES = {"k": ("batch", "kv_heads", "head_dim", "seq"), "v": ("batch", "kv_heads", "seq", "head_dim")}


def init_cache(cfg: ModelConfig, batch_size: int, length: int) -> list | dict:
  """An empty KV cache for `Transformer.decode`: per layer keys [B,K,H,M], values [B,K,M,H] (M =
  `length` slots, `CACHE_AXES`) and the next slot. A list of per-layer dicts, or one dict with a
  leading layer axis when `cfg.scan_layers`."""
  K, H, L, M = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers, length
  lead = (L,) if cfg.scan_layers else ()
  layer = lambda: {"k": jnp.zeros(lead + (batch_size, K, H, M), cfg.compute_dtype),
                   "v": jnp.zeros(lead + (batch_size, K, M, H), cfg.compute_dtype),
                   "index": jnp.zeros(lead, jnp.int32)}
  return layer() if cfg.scan_layers else [layer() for _ in range(L)]


def _update_cache(cache: dict, k_BxSxKxH: Array, v_BxSxKxH: Array, kv_valid_Bx1x1xM: Array | None = None):
  """Writes S new keys/values at slot `index`; the mask [B,1,S,M] lets query i see slots <= index + i.

  `kv_valid_Bx1x1xM` (ragged batches): the slots that hold a row's tokens. A row's left padding is
  never a key of its real tokens; a padding query sees only its own slot (its output is unused, and
  no query row is ever empty).
  """
  i, S = cache["index"], k_BxSxKxH.shape[1]
  k_new_BxKxHxS = jnp.transpose(k_BxSxKxH, (0, 2, 3, 1)).astype(cache["k"].dtype)
  v_new_BxKxSxH = jnp.transpose(v_BxSxKxH, (0, 2, 1, 3)).astype(cache["v"].dtype)
  k_BxKxHxM = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_new_BxKxHxS, i, axis=3)
  v_BxKxMxH = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_new_BxKxSxH, i, axis=2)
  q_slot_S, kv_slot_M = i + jnp.arange(S), jnp.arange(k_BxKxHxM.shape[3])
  mask_1x1xSxM = (kv_slot_M[None, :] <= q_slot_S[:, None])[None, None]
  if kv_valid_Bx1x1xM is not None:
    own_1x1xSxM = (kv_slot_M[None, :] == q_slot_S[:, None])[None, None]
    mask_1x1xSxM = mask_1x1xSxM & (kv_valid_Bx1x1xM | own_1x1xSxM)
  return k_BxKxHxM, v_BxKxMxH, mask_1x1xSxM, {"k": k_BxKxHxM, "v": v_BxKxMxH, "index": i + S}


def _cached_attention(q_BxSxNxH: Array, k_BxKxHxM: Array, v_BxKxMxH: Array, mask_Bx1xSxM: Array) -> Array:
  """`jax.nn.dot_product_attention`'s XLA path (float32 logits and softmax, the same scale and mask
  value) on the cache's layouts, grouped-query heads n = k * G + g as it groups them."""
  B, S, N, H = q_BxSxNxH.shape
  K = k_BxKxHxM.shape[1]
  q_BxKxSxGxH = jnp.transpose(q_BxSxNxH.reshape(B, S, K, N // K, H), (0, 2, 1, 3, 4))
  bf16 = q_BxSxNxH.dtype == jnp.bfloat16
  precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if bf16 else None
  logits_BxKxSxGxM = jnp.einsum("bksgh,bkhm->bksgm", q_BxKxSxGxH, k_BxKxHxM, precision=precision,
                                preferred_element_type=jnp.float32) * jnp.float32(H ** -0.5)
  mask_Bx1xSx1xM = mask_Bx1xSxM[:, :, :, None, :]
  logits_BxKxSxGxM = jnp.where(mask_Bx1xSx1xM, logits_BxKxSxGxM, -0.7 * float(jnp.finfo(jnp.float32).max))
  probs_BxKxSxGxM = jax.nn.softmax(logits_BxKxSxGxM, axis=-1).astype(v_BxKxMxH.dtype)
  out_BxKxSxGxH = jnp.einsum("bksgm,bkmh->bksgh", probs_BxKxSxGxM, v_BxKxMxH)
  return jnp.transpose(out_BxKxSxGxH, (0, 2, 1, 3, 4)).reshape(B, S, N, H)


class Attention(nn.Module):
  """Causal self-attention. With `cache` (decoding) keys/values are appended to it and it is returned."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxT, deterministic: bool, cache: dict | None = None):
    cfg = self.cfg
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    std, qkv_bias = cfg.init_std, cfg.attention_bias in ("qkv", "qkvo")
    q_BxTxNxH = _dense(cfg, (N, H), ("embed", "heads", "head_dim"), std, "query", qkv_bias)(x_BxTxD)
    k_BxTxKxH = _dense(cfg, (K, H), ("embed", "kv_heads", "head_dim"), std, "key", qkv_bias)(x_BxTxD)
    v_BxTxKxH = _dense(cfg, (K, H), ("embed", "kv_heads", "head_dim"), std, "value", qkv_bias)(x_BxTxD)
    if cfg.qk_norm:  # before rope, which rotates pairs of channels and so keeps each head's RMS
      q_BxTxNxH = _head_norm(cfg, "query_norm")(q_BxTxNxH)
      k_BxTxKxH = _head_norm(cfg, "key_norm")(k_BxTxKxH)
    if cfg.position == "rope":
      q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, cfg.rope_theta)
      k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, cfg.rope_theta)
    if cache is None:
      out_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask_Bx1xTxT,
                                                 is_causal=True, implementation=_attention_impl(cfg))
    else:  # the same projections and rope as training; only the key set grows
      # (decoding passes the cache slots that hold tokens as `mask_Bx1xTxT`, [B,1,1,M], or None)
      k_BxKxHxM, v_BxKxMxH, mask_Bx1xTxM, cache = _update_cache(cache, k_BxTxKxH, v_BxTxKxH, mask_Bx1xTxT)
      out_BxTxNxH = _cached_attention(q_BxTxNxH, k_BxKxHxM, v_BxKxMxH, mask_Bx1xTxM)
    out_std = std / (2 * cfg.num_layers) ** 0.5  # GPT-2: residual projections scaled by 1/sqrt(2L)
    out_BxTxD = _dense(cfg, cfg.embed_dim, ("heads", "head_dim", "embed"), out_std, "out",
                       cfg.attention_bias == "qkvo")(out_BxTxNxH)
    return nn.Dropout(cfg.dropout)(out_BxTxD, deterministic=deterministic), cache


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, deterministic: bool):
    cfg = self.cfg
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    up = lambda name: _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), cfg.init_std, name, cfg.mlp_bias)
    if cfg.mlp == "swiglu":
      h_BxTxF = nn.silu(up("gate")(x_BxTxD)) * up("up")(x_BxTxD)
    elif cfg.mlp == "relu2":  # modded-nanogpt
      h_BxTxF = jnp.square(nn.relu(up("up")(x_BxTxD)))
    else:
      h_BxTxF = nn.gelu(up("up")(x_BxTxD), approximate=True)
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, ("batch", "seq", "mlp"))
    out_BxTxD = _dense(cfg, cfg.embed_dim, ("mlp", "embed"), out_std, "down", cfg.mlp_bias)(h_BxTxF)
    return nn.Dropout(cfg.dropout)(out_BxTxD, deterministic=deterministic)


class Block(nn.Module):
  """Pre-norm residual block. The (carry, cache) signature lets `nn.scan` stack it (cache None in training)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxT, deterministic: bool, cache: dict | None = None):
    h_BxTxD, cache = Attention(self.cfg, name="attn")(
        _norm(self.cfg, "attn_norm")(x_BxTxD), positions_BxT, mask_Bx1xTxT, deterministic, cache)
    x_BxTxD = x_BxTxD + h_BxTxD
    x_BxTxD = x_BxTxD + Mlp(self.cfg, name="mlp")(_norm(self.cfg, "mlp_norm")(x_BxTxD), deterministic)
    return nn.with_logical_constraint(x_BxTxD, ("batch", "seq", "embed")), cache


def _block_class(cfg: ModelConfig):
  block = Block
  if cfg.remat != "none":
    policy = {"full": None, "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    block = nn.remat(block, policy=policy[cfg.remat], static_argnums=(4,))
  if cfg.scan_layers:
    block = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return block


class Transformer(nn.Module):
  """`apply(params, inputs_BxT, positions_BxT, segment_ids_BxT) -> logits_BxTxV` (float32-safe dtype).

  The pieces are separate methods so the head can be fused with the loss and so tests can
  differentiate with respect to the embeddings: `embed` -> `backbone` -> `head`.
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.token_embed = Embed(
        cfg.vocab_size, cfg.embed_dim, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
        embedding_init=_init(cfg.init_std, ("vocab", "embed")))
    if cfg.position == "learned":
      self.position_embed = Embed(
          cfg.max_len, cfg.embed_dim, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
          embedding_init=_init(cfg.init_std, (None, "embed")), lookup_axes=(None, None))
    block = _block_class(cfg)
    if cfg.scan_layers:
      self.blocks = block(cfg, name="blocks")
    else:
      self.blocks = [block(cfg, name=f"block_{i}") for i in range(cfg.num_layers)]
    self.final_norm = _norm(cfg, "final_norm")
    if not cfg.tie_embeddings:  # no bias on the head, whatever use_bias says (GPT-2 has none)
      self.lm_head = Projection(cfg, (cfg.vocab_size,), ("embed", "vocab"), cfg.init_std, name="lm_head")
    self.drop = nn.Dropout(cfg.dropout)

  def embed(self, inputs_BxT, positions_BxT=None, deterministic: bool = True):
    x_BxTxD = self.token_embed(inputs_BxT)
    if self.cfg.position == "learned":
      x_BxTxD = x_BxTxD + self.position_embed(_positions(inputs_BxT, positions_BxT))
    return self.drop(x_BxTxD, deterministic=deterministic)

  def backbone(self, x_BxTxD, positions_BxT=None, segment_ids_BxT=None, deterministic: bool = True):
    """Blocks and the final norm: embeddings -> hidden states [B,T,D]."""
    positions_BxT = _positions(x_BxTxD[..., 0], positions_BxT)
    mask = attention_mask(segment_ids_BxT)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "seq", "embed"))
    x_BxTxD, _ = self._blocks(x_BxTxD, positions_BxT, mask, deterministic, None)
    return self.final_norm(x_BxTxD)

  def _blocks(self, x_BxTxD, positions_BxT, mask, deterministic, cache):
    if self.cfg.scan_layers:
      return self.blocks(x_BxTxD, positions_BxT, mask, deterministic, cache)
    new_cache = None if cache is None else []
    for i, block in enumerate(self.blocks):
      x_BxTxD, c = block(x_BxTxD, positions_BxT, mask, deterministic, None if cache is None else cache[i])
      if cache is not None:
        new_cache.append(c)
    return x_BxTxD, new_cache

  def decode(self, inputs_BxS, positions_BxS, cache, last_only: bool = False, kv_valid_BxM=None):
    """Incremental forward for sampling: logits [B,S,V] of S new tokens and the updated cache.

    The same embed -> blocks -> head as `__call__`; attention reads the cached keys/values of
    earlier tokens (`init_cache`), so feeding a sequence in pieces gives the full-forward logits.
    `last_only`: logits of the last new token only ([B,1,V]; a prefill needs no more).
    `kv_valid_BxM`: which of the cache's M slots hold each row's tokens (left-padded prompts of
    different lengths; None: all), with `positions_BxS` counting from each row's first token.
    """
    mask = None if kv_valid_BxM is None else kv_valid_BxM[:, None, None, :]
    x_BxSxD = self.embed(inputs_BxS, positions_BxS)
    x_BxSxD, cache = self._blocks(x_BxSxD, positions_BxS, mask, True, cache)
    if last_only:
      x_BxSxD = x_BxSxD[:, -1:]
    return self.head(self.final_norm(x_BxSxD)), cache

  def hidden_states(self, inputs_BxT, positions_BxT=None, segment_ids_BxT=None,
                    deterministic: bool = True):
    """Embeddings -> blocks -> final norm, no head: what `objective.score` feeds `head` (chunked or not)."""
    x_BxTxD = self.embed(inputs_BxT, positions_BxT, deterministic)
    return self.backbone(x_BxTxD, positions_BxT, segment_ids_BxT, deterministic)

  def head(self, h_BxTxD):
    """Logits [B,T,V]. Ids at or above `cfg.vocab_limit` (padding rows no tokenizer can produce or
    decode) get -inf: every objective, every score and the sampler normalise over the same ids,
    and none of them can put mass on an id that is not a token."""
    cfg = self.cfg
    if cfg.tie_embeddings:  # as a 2-D matmul, for the reason given in `Projection`
      h_NxD = h_BxTxD.reshape(-1, h_BxTxD.shape[-1])
      logits_BxTxV = self.token_embed.attend(h_NxD).reshape(h_BxTxD.shape[:-1] + (cfg.vocab_size,))
    else:
      logits_BxTxV = self.lm_head(h_BxTxD)
    if cfg.vocab_limit is not None and cfg.vocab_limit < cfg.vocab_size:
      logits_BxTxV = jnp.where(jnp.arange(cfg.vocab_size) < cfg.vocab_limit, logits_BxTxV, -jnp.inf)
    return nn.with_logical_constraint(logits_BxTxV, ("batch", "seq", "vocab"))

  def __call__(self, inputs_BxT, positions_BxT=None, segment_ids_BxT=None, deterministic: bool = True):
    return self.head(self.hidden_states(inputs_BxT, positions_BxT, segment_ids_BxT, deterministic))


class ScoredTransformer(Transformer):
  """A `Transformer` with a score head: `score(...) -> [B,T]`, one float32 number per position from its
  final hidden state (`score_head`: [D] -> 1, with a bias). A reward model reads it at a response's last
  position (`objectives/reward_model.py`). The LM head stays, so an LM run's params restore into it
  unchanged (`run/stage.py` adds a fresh score head)."""

  def setup(self):
    super().setup()
    self.score_head = Projection(self.cfg, (1,), ("embed", None), self.cfg.init_std, bias=True, name="score_head")

  def score(self, inputs_BxT, positions_BxT=None, segment_ids_BxT=None, deterministic: bool = True):
    return self.score_of(self.hidden_states(inputs_BxT, positions_BxT, segment_ids_BxT, deterministic))

  def score_of(self, h_BxTxD):
    """The score head on final hidden states [B,T,D] -> [B,T] float32 (one backbone pass can feed both heads)."""
    return self.score_head(h_BxTxD)[..., 0].astype(jnp.float32)

  def __call__(self, inputs_BxT, positions_BxT=None, segment_ids_BxT=None, deterministic: bool = True):
    h_BxTxD = self.hidden_states(inputs_BxT, positions_BxT, segment_ids_BxT, deterministic)
    if self.is_initializing():  # `model.init` creates the score head's params with the rest
      self.score_head(h_BxTxD)
    return self.head(h_BxTxD)


def _positions(inputs_BxT, positions_BxT):
  if positions_BxT is not None:
    return positions_BxT
  return jnp.broadcast_to(jnp.arange(inputs_BxT.shape[1]), inputs_BxT.shape)


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in a matmul per token: all blocks plus the LM head (V*D).

  Embedding lookups cost no FLOPs; a tied table is counted once, as the head. Norm scales
  and biases are included (negligible). This is the N of nanoGPT's 6N formula.
  """
  D, F, L, V = cfg.embed_dim, cfg.mlp_dim, cfg.num_layers, cfg.vocab_size
  attn = D * cfg.num_heads * cfg.head_dim + 2 * D * cfg.num_kv_heads * cfg.head_dim
  attn += cfg.num_heads * cfg.head_dim * D
  mlp = (3 if cfg.mlp == "swiglu" else 2) * D * F
  qkv_bias = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
  mlp_bias = (2 if cfg.mlp == "swiglu" else 1) * F + D
  bias = (qkv_bias if cfg.use_bias or cfg.attention_bias != "none" else 0)
  bias += (D if cfg.use_bias or cfg.attention_bias == "qkvo" else 0) + (mlp_bias if cfg.use_bias or cfg.mlp_bias else 0)
  norm = D * (2 if cfg.norm == "layernorm" and cfg.use_bias else 1)
  per_layer = attn + mlp + 2 * norm + bias + (2 * cfg.head_dim if cfg.qk_norm else 0)
  return L * per_layer + norm + V * D  # + the final norm and the head


def flops_per_token(cfg: ModelConfig, context_length: int) -> float:
  """Training FLOPs per token (forward + backward), nanoGPT / PaLM appendix B formula:

      6 * N + 12 * L * D * T

  N = `matmul_params(cfg)` (2 FLOPs per multiply-add, x3 for backward); the second term is the
  attention scores and weighted sum (QK^T and AV, 2*2*T*D per layer forward, x3), counted over the
  full T x T square as nanoGPT does (causal masking is not subtracted).
  """
  return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.embed_dim * context_length
