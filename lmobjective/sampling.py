"""The sampler: prompts of different lengths in; responses, their masks and the log-probs they were
drawn with out. One jitted program (a prefill, then a `while_loop` of one-token steps against the
KV cache) serves the notebook, the benchmarks and the rollouts of reward maximisation.

Layout. Prompts are left-padded to P slots (the longest prompt, rounded up to a bucket), so new
token t of every row lands in cache slot P + t. A row's padding is never a key of its tokens
(`Transformer.decode`'s `kv_valid_BxM`) and its positions count from its first token, so each row
samples what it would alone.

The distribution. `logps(logits, cfg)` is temperature, then top-k, then top-p (the smallest set of
most likely ids whose mass reaches top_p), renormalised by one log-softmax. The sampler draws from
it and reports the drawn id's log-prob under it; a trainer scoring the same tokens calls the same
function, so the two sides cannot disagree on temperature or truncation (TRL's users hit both).
At temperature 1 without truncation it is `log_softmax(logits)`, what `next_token.score` computes,
over the same ids: the model's head gives padded vocabulary rows -inf (`Transformer.head`).
Greedy decoding (temperature 0) takes the argmax and reports its log-prob at temperature 1.

Stopping. A row stops at its first stop id (EOS for a plain prompt, the chat template's `<|end|>`
for a chat prompt), which is inside its response mask; later slots hold `pad_id`, are outside the
mask and carry log-prob 0. The loop ends when every row has stopped or after `max_new_tokens`; a
row that never stopped is `truncated`. Stopped rows keep their slots and change no other row.

Seeds. Row r draws step t with fold_in(fold_in(fold_in(key(seed), iteration), r), t): its tokens
depend on neither its batch, nor the mesh, nor the other rows, and a resumed run that samples
iteration i again draws the same tokens.

`sample` (cached) and `sample_uncached` (the reference: a full training forward per new token) are
pure functions; `Sampler` validates prompts, lays them out and runs `sample` as a
`sharding.Program` with the batch over the mesh's data axes. `response_batch` turns samples into the
rows a preference pair is scored on (prompt, then response, right-padded), for `next_token.score`.

Shape legend: B batch, P prompt slots, N new tokens (max_new_tokens), M = P + N cache slots,
T = M - 1 scored positions, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmobjective import sharding
from lmobjective.model import CACHE_AXES, Transformer, init_cache
from lmobjective.objectives.distribution import SamplingConfig, logps, score  # noqa: F401 (sampling.logps, ...)


class Samples(NamedTuple):
  """What `sample` returns (jax arrays; N = max_new_tokens)."""
  tokens: jax.Array  # int32 [B,N]: the response, pad_id after its stop id
  response_mask: jax.Array  # bool [B,N]: the response's tokens, its stop id included, nothing after
  logps: jax.Array  # float32 [B,N]: log-prob of each token under the distribution it was drawn from; 0 off the mask
  truncated: jax.Array  # bool [B]: no stop id within max_new_tokens
  lengths: jax.Array  # int32 [B]: tokens in the response mask


# ---- the distribution ------------------------------------------------------------------------------


def draw(logp_BxV: jax.Array, keys_B: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """One id per row from `logps`' distribution, row b with its own key (argmax at temperature 0)."""
  if cfg.temperature == 0:
    return jnp.argmax(logp_BxV, axis=-1).astype(jnp.int32)
  return jax.vmap(jax.random.categorical)(keys_B, logp_BxV).astype(jnp.int32)


def row_keys(seed: jax.Array, iteration: jax.Array, rows_B: jax.Array) -> jax.Array:
  """Row r's key at `iteration`: fold_in(fold_in(key(seed), iteration), r) (typed keys [B])."""
  base = jax.random.fold_in(jax.random.key(seed), iteration)
  return jax.vmap(lambda r: jax.random.fold_in(base, r))(rows_B)


# ---- the decode loop -------------------------------------------------------------------------------


def _layout(prompt_lengths_B: jax.Array, P: int, M: int) -> tuple[jax.Array, jax.Array]:
  """(kv_valid [B,M], positions [B,M]) of left-padded prompts: a row's slots from its first token on,
  and positions counting from that token (0 on padding)."""
  start_Bx1 = (P - prompt_lengths_B)[:, None]
  slot_1xM = jnp.arange(M)[None, :]
  return slot_1xM >= start_Bx1, jnp.maximum(slot_1xM - start_Bx1, 0).astype(jnp.int32)


def _loop(first_logits_BxV: jax.Array, next_logits: Callable, state, keys_B: jax.Array,
          cfg: SamplingConfig) -> Samples:
  """Draws up to N tokens; `next_logits(state, tok_B, t)` -> (logits after new token t, state)."""
  B, N = first_logits_BxV.shape[0], cfg.max_new_tokens
  stop_S = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)

  def body(carry):
    t, logits_BxV, state, tokens_BxN, mask_BxN, logps_BxN, done_B = carry
    logp_BxV = logps(logits_BxV, cfg)
    tok_B = draw(logp_BxV, jax.vmap(jax.random.fold_in, (0, None))(keys_B, t), cfg)
    lp_B = jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]
    tok_B = jnp.where(done_B, cfg.pad_id, tok_B)
    put = lambda buf_BxN, x_B: jax.lax.dynamic_update_slice_in_dim(buf_BxN, x_B[:, None], t, axis=1)
    tokens_BxN, mask_BxN = put(tokens_BxN, tok_B), put(mask_BxN, ~done_B)
    logps_BxN = put(logps_BxN, jnp.where(done_B, 0.0, lp_B))
    done_B = done_B | (tok_B[:, None] == stop_S[None, :]).any(axis=-1)
    logits_BxV, state = next_logits(state, tok_B, t)
    return t + 1, logits_BxV, state, tokens_BxN, mask_BxN, logps_BxN, done_B

  def cond(carry):
    return (carry[0] < N) & ~carry[-1].all()

  carry = (jnp.int32(0), first_logits_BxV, state, jnp.full((B, N), cfg.pad_id, jnp.int32),
           jnp.zeros((B, N), bool), jnp.zeros((B, N), jnp.float32), jnp.zeros((B,), bool))
  _, _, _, tokens_BxN, mask_BxN, logps_BxN, done_B = jax.lax.while_loop(cond, body, carry)
  return Samples(tokens_BxN, mask_BxN, logps_BxN, ~done_B, mask_BxN.sum(axis=-1, dtype=jnp.int32))


def _constrain_cache(cache):
  """The cache's batch axis over the mesh's batch axes, its kv heads over `tensor` (as the weights)."""
  def layer(c: dict) -> dict:
    lead = ("layers",) * (c["k"].ndim - 4)
    return {**c, **{n: nn.with_logical_constraint(c[n], lead + CACHE_AXES[n]) for n in CACHE_AXES}}
  return layer(cache) if isinstance(cache, dict) else [layer(c) for c in cache]


def gathered(model: Transformer, params):
  """`params` gathered over `fsdp` once, before the decode loop (still split over `tensor`).

  FSDP keeps each weight split over `fsdp` and gathers it where it is used; inside a `while_loop`
  that is an all-gather of every weight at every new token. Decoding reads the whole model per
  token anyway, so the sampler holds it gathered for the whole loop (`embed` unsharded).
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  axes = nn.get_partition_spec(shapes)["params"]
  axes = {k: v for k, v in axes.items() if k in params}  # e.g. a reference without the policy's value head
  rules = tuple((name, None if mesh_axes == "fsdp" else mesh_axes) for name, mesh_axes in sharding.RULES)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  return jax.tree.map(lambda spec, x: nn.with_logical_constraint(x, spec, rules=rules), axes, params,
                      is_leaf=is_spec)


def _prefill(model: Transformer, params, prompt_BxP: jax.Array, prompt_lengths_B: jax.Array, M: int):
  """(logits [B,V] of each row's first new token, the cache of M slots, the decode function)."""
  B, P = prompt_BxP.shape
  params = gathered(model, params)
  kv_valid_BxM, positions_BxM = _layout(prompt_lengths_B, P, M)
  decode = functools.partial(model.apply, {"params": params}, method=Transformer.decode,
                             kv_valid_BxM=kv_valid_BxM)
  cache = _constrain_cache(init_cache(model.cfg, B, M))
  logits_Bx1xV, cache = decode(prompt_BxP, positions_BxM[:, :P], cache, last_only=True)
  return logits_Bx1xV[:, 0], cache, decode


def next_logps(model: Transformer, params, prompt_BxP: jax.Array, prompt_lengths_B: jax.Array, *,
               cfg: SamplingConfig) -> jax.Array:
  """`logps` [B,V] of the first token `sample` would draw after each left-padded prompt."""
  logits_BxV, _, _ = _prefill(model, params, prompt_BxP, prompt_lengths_B, prompt_BxP.shape[1])
  return logps(logits_BxV, cfg)


def sample(model: Transformer, params, prompt_BxP: jax.Array, prompt_lengths_B: jax.Array,
           rows_B: jax.Array, seed: jax.Array, iteration: jax.Array, *, cfg: SamplingConfig) -> Samples:
  """`Samples` after left-padded prompts (row b's `prompt_lengths_B[b]` tokens end at slot P - 1),
  decoding with a KV cache of M = P + N slots. `rows_B`: each row's global index (its seed)."""
  P = prompt_BxP.shape[1]
  first_BxV, cache, decode = _prefill(model, params, prompt_BxP, prompt_lengths_B, P + cfg.max_new_tokens)

  def next_logits(cache, tok_B, t):
    logits_Bx1xV, cache = decode(tok_B[:, None], (prompt_lengths_B + t)[:, None], cache)
    return logits_Bx1xV[:, 0], _constrain_cache(cache)

  return _loop(first_BxV, next_logits, cache, row_keys(seed, iteration, rows_B), cfg)


def sample_uncached(model: Transformer, params, prompt_BxP: jax.Array, prompt_lengths_B: jax.Array,
                    rows_B: jax.Array, seed: jax.Array, iteration: jax.Array, *,
                    cfg: SamplingConfig) -> Samples:
  """The reference for `sample`: the same layout, keys and loop, but every new token's logits come
  from the ordinary training forward over the whole [B, M] buffer (padding as segment 0)."""
  B, P = prompt_BxP.shape
  M = P + cfg.max_new_tokens
  kv_valid_BxM, positions_BxM = _layout(prompt_lengths_B, P, M)
  buf_BxM = jnp.full((B, M), cfg.pad_id, jnp.int32).at[:, :P].set(prompt_BxP)

  def logits_at(buf_BxM, slot):
    h_BxMxD = model.apply({"params": params}, buf_BxM, positions_BxM, kv_valid_BxM.astype(jnp.int32),
                          method="hidden_states")
    h_Bx1xD = jax.lax.dynamic_slice_in_dim(h_BxMxD, slot, 1, axis=1)
    return model.apply({"params": params}, h_Bx1xD, method="head")[:, 0]

  def next_logits(buf_BxM, tok_B, t):
    buf_BxM = jax.lax.dynamic_update_slice_in_dim(buf_BxM, tok_B[:, None], P + t, axis=1)
    return logits_at(buf_BxM, P + t), buf_BxM

  return _loop(logits_at(buf_BxM, P - 1), next_logits, buf_BxM, row_keys(seed, iteration, rows_B), cfg)


# ---- scoring what was sampled ----------------------------------------------------------------------


def response_batch(prompt_BxP: jax.Array, prompt_lengths_B: jax.Array, samples: Samples,
                   pad_id: int = 0) -> dict[str, jax.Array]:
  """The [B, T = P + N - 1] rows `next_token.score` reads, laid out as a preference pair's row: the
  prompt from column 0, the response after it, padding (segment 0) after that; `loss_mask` on
  the response's targets. `sequence_logps` of it is log π(response | prompt)."""
  B, P = prompt_BxP.shape
  N = samples.tokens.shape[1]
  seq_BxM = jnp.concatenate([prompt_BxP, samples.tokens], axis=1)
  col_1xM = jnp.arange(P + N)[None, :]
  start_Bx1, used_Bx1 = (P - prompt_lengths_B)[:, None], (prompt_lengths_B + samples.lengths)[:, None]
  src_BxM = jnp.minimum(col_1xM + start_Bx1, P + N - 1)
  used_BxM = col_1xM < used_Bx1
  tokens_BxM = jnp.where(used_BxM, jnp.take_along_axis(seq_BxM, src_BxM, axis=1), pad_id)
  response_BxM = used_BxM & (col_1xM >= prompt_lengths_B[:, None])
  seg_BxM = used_BxM.astype(jnp.int32)
  return {"inputs": tokens_BxM[:, :-1], "targets": tokens_BxM[:, 1:], "loss_mask": response_BxM[:, 1:],
          "segment_ids": seg_BxM[:, :-1],
          "positions": jnp.where(used_BxM[:, :-1], col_1xM[:, :-1], 0).astype(jnp.int32)}


# ---- the host side ---------------------------------------------------------------------------------


class Sampler:
  """`sample` of one model on one mesh, from token-id prompts.

  `sampler(params, prompts, cfg, seed=..., iteration=...)` validates the prompts (one line naming
  the prompt), left-pads them to a multiple of `bucket` slots (fewer programs to compile), places
  the batch over the mesh's data axes and returns `Samples` and the laid-out prompts. With several
  processes, `prompts` are this process's rows and `rows` their global indices.
  """

  def __init__(self, model: Transformer, mesh, bucket: int = 16, cached: bool = True):
    self.model, self.mesh, self.bucket = model, mesh, bucket
    fn = sample if cached else sample_uncached
    self.program = sharding.Program(functools.partial(fn, model), mesh, static_argnames=("cfg",))
    self.first_program = sharding.Program(functools.partial(next_logps, model), mesh, static_argnames=("cfg",))

  @property
  def context_length(self) -> int:
    return int(self.model.cfg.max_len)

  def layout(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """(left-padded prompts [B,P] int32, lengths [B]) after checking each prompt fits."""
    room = self.context_length - cfg.max_new_tokens
    if room < 1:
      raise ValueError(f"max_new_tokens={cfg.max_new_tokens}: leaves no room for a prompt in the model's "
                       f"context of {self.context_length} tokens")
    if not len(prompts):
      raise ValueError("prompts: no prompt to sample from")
    lengths = np.array([len(p) for p in prompts], np.int32)
    for i, n in enumerate(lengths):
      if n == 0:
        raise ValueError(f"prompt {i} is empty: a response is sampled after at least one token (EOS opens a document)")
      if n > room:
        raise ValueError(f"prompt {i} has {n} tokens: more than context_length {self.context_length} - "
                         f"max_new_tokens {cfg.max_new_tokens} = {room}")
    P = min(-(-int(lengths.max()) // self.bucket) * self.bucket, room)
    out = np.full((len(prompts), P), cfg.pad_id, np.int32)
    for i, p in enumerate(prompts):
      out[i, P - len(p):] = p
    return out, lengths

  def _place(self, local: dict) -> dict:
    B = len(next(iter(local.values())))
    shards = int(np.prod([self.mesh.shape[a] for a in sharding.BATCH_AXES]))
    if (B * jax.process_count()) % shards:
      raise ValueError(f"prompts: a batch of {B * jax.process_count()} rows does not split over the mesh's "
                       f"{shards} batch shards (data x fsdp); pad the batch to a multiple of {shards}")
    return sharding.global_batch(local, self.mesh)

  def _arguments(self, prompts, cfg, seed, iteration, rows):
    prompt_BxP, lengths_B = self.layout(prompts, cfg)
    B = len(lengths_B)
    if rows is None:
      rows = jax.process_index() * B + np.arange(B)
    glob = self._place({"prompt": prompt_BxP, "lengths": lengths_B, "rows": np.asarray(rows, np.int32)})
    rep = sharding.replicated(self.mesh)
    scalars = [jax.device_put(np.int32(x), rep) for x in (seed, iteration)]
    return (glob["prompt"], glob["lengths"], glob["rows"], *scalars), prompt_BxP, lengths_B

  def __call__(self, params, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *, seed: int = 0,
               iteration: int = 0, rows: Sequence[int] | None = None) -> tuple[Samples, np.ndarray, np.ndarray]:
    """(`Samples` as global arrays, prompts [B,P], lengths [B]) of this process's `prompts`; row i
    of them is seeded by `rows[i]` (default: its global index)."""
    args, prompt_BxP, lengths_B = self._arguments(prompts, cfg, seed, iteration, rows)
    return self.program(params, *args, cfg=cfg), prompt_BxP, lengths_B

  def compile(self, params, prompts: Sequence[Sequence[int]], cfg: SamplingConfig):
    """The executable a call with these prompts' shapes runs (compiled now, once; reused by calls)."""
    args, _, _ = self._arguments(prompts, cfg, 0, 0, None)
    return self.program.compile(params, *args, cfg=cfg)

  def next_logps(self, params, prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> jax.Array:
    """`logps` [B,V] of the first token this sampler would draw after each prompt."""
    prompt_BxP, lengths_B = self.layout(prompts, cfg)
    glob = self._place({"prompt": prompt_BxP, "lengths": lengths_B})
    return self.first_program(params, glob["prompt"], glob["lengths"], cfg=cfg)
