"""Memory-efficient cross-entropy: the LM head fused with the loss, computed in chunks of positions.

The dense path materialises logits [B,T,V] in float32, plus the softmax and its gradient of the
same size: with V=262,144 and 16k tokens per step that is 17 GB per buffer. Here the positions
are split into chunks of C; each chunk computes its logits [B,C,V] through the model's own head
(tied or untied, same dtype handling, same sharding constraints), reduces them to per-token
statistics, and drops them. The chunk body is wrapped in `jax.checkpoint`, so the backward pass
recomputes one chunk's logits at a time instead of storing them: the gradient is the exact
autodiff gradient (no approximation), at the cost of one extra head matmul.

Per-token statistics (nll, logsumexp, argmax-correct) are [B,T] only, and they are reduced with
the same `objective.accurate_sum` as the dense path, so the two agree to float rounding.

Chunks run along T (not over flattened tokens) so every chunk keeps the batch axis and its
data/fsdp sharding: each device works on its own rows at every scan step.

Shape legend: B batch, T positions, C positions per chunk, n chunks, D embed, V vocabulary.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lmobjective import objective


def _pad_positions(x, pad: int, value):
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def token_statistics(head_fn: Callable[[jax.Array], jax.Array], h_BxTxD: jax.Array,
                     targets_BxT: jax.Array, mask_BxT: jax.Array | None, chunk_size: int
                     ) -> objective.TokenLosses:
  """Per-position losses of `head_fn(h)` without ever holding more than [B,C,V] logits.

  Args:
    head_fn: hidden states [B,C,D] -> logits [B,C,V] (any float dtype; scored in float32).
    h_BxTxD: final hidden states.
    targets_BxT: int ids; negative ids (-100) are ignored.
    mask_BxT: optional bool/0-1; false positions are ignored.
    chunk_size: C; need not divide T (the tail is padded with ignored positions).
  """
  B, T, D = h_BxTxD.shape
  C = min(chunk_size, T)
  n = -(-T // C)
  pad = n * C - T
  valid_BxT = objective.valid_targets(targets_BxT, mask_BxT)
  safe_BxT = jnp.where(valid_BxT, targets_BxT, 0)
  if pad:
    h_BxTxD = _pad_positions(h_BxTxD, pad, 0)
    safe_BxT = _pad_positions(safe_BxT, pad, 0)
    valid_BxT = _pad_positions(valid_BxT, pad, False)
  to_chunks = lambda x: x.reshape((B, n, C) + x.shape[2:]).swapaxes(0, 1)  # [n,B,C,...]

  def chunk(_, xs):
    h_BxCxD, t_BxC, v_BxC = xs
    logits_BxCxV = head_fn(h_BxCxD).astype(jnp.float32)
    log_z_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
    nll_BxC = jnp.where(v_BxC, log_z_BxC - target_logit_BxC, 0.0)
    correct_BxC = v_BxC & (jnp.argmax(logits_BxCxV, axis=-1) == t_BxC)
    return None, (nll_BxC, jnp.where(v_BxC, log_z_BxC, 0.0), correct_BxC)

  # prevent_cse=False: the scan already keeps the recomputation from being merged away.
  _, stats = jax.lax.scan(jax.checkpoint(chunk, prevent_cse=False), None,
                          (to_chunks(h_BxTxD), to_chunks(safe_BxT), to_chunks(valid_BxT)))
  from_chunks = lambda x: x.swapaxes(0, 1).reshape(B, n * C)[:, :T]
  nll_BxT, log_z_BxT, correct_BxT = (from_chunks(s) for s in stats)
  valid_BxT = valid_BxT[:, :T]
  return objective.TokenLosses(
      nll=nll_BxT, p_target=jnp.where(valid_BxT, jnp.exp(-nll_BxT), 0.0), log_z=log_z_BxT,
      correct=correct_BxT.astype(jnp.float32), valid=valid_BxT)


def loss_sums(head_fn, h_BxTxD, targets_BxT, mask_BxT=None, chunk_size: int = 1024,
              token_bytes_V=None) -> objective.LossSums:
  """`objective.loss_sums(head_fn(h), ...)` computed chunk by chunk (same sums, same gradients)."""
  losses = token_statistics(head_fn, h_BxTxD, targets_BxT, mask_BxT, chunk_size)
  if token_bytes_V is None:
    bytes_sum = jnp.zeros((), jnp.float32)
  else:
    safe = jnp.where(losses.valid, targets_BxT, 0)
    bytes_sum = jnp.where(losses.valid, token_bytes_V[safe], 0).sum().astype(jnp.float32)
  return objective.LossSums(
      loss_sum=objective.accurate_sum(losses.nll, losses.valid),
      num_tokens=losses.valid.sum(dtype=jnp.int32), z_sum=jnp.square(losses.log_z).sum(),
      correct_sum=losses.correct.sum(), bytes_sum=bytes_sum)


def cross_entropy(head_fn, h_BxTxD, targets_BxT, mask_BxT=None, chunk_size: int = 1024):
  """Chunked twin of `objective.cross_entropy`: `(loss_sum, num_tokens)`."""
  losses = token_statistics(head_fn, h_BxTxD, targets_BxT, mask_BxT, chunk_size)
  return objective.accurate_sum(losses.nll, losses.valid), losses.valid.sum(dtype=jnp.int32)


def hidden_states(module, inputs_BxT, positions_BxT=None, segment_ids_BxT=None,
                  deterministic: bool = True):
  """For `model.apply(..., method=hidden_states)`: embeddings -> blocks -> final norm, no head."""
  x_BxTxD = module.embed(inputs_BxT, positions_BxT, deterministic)
  return module.backbone(x_BxTxD, positions_BxT, segment_ids_BxT, deterministic)


def model_loss_sums(model, params, batch: dict, *, chunk_size: int, deterministic: bool = True,
                    rngs=None, token_bytes_V=None) -> objective.LossSums:
  """Loss sums of `model` on `batch`; chunked (logits never whole) when chunk_size > 0."""
  variables = {"params": params}
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  if not chunk_size:
    logits_BxTxV = model.apply(variables, *args, deterministic=deterministic, rngs=rngs)
    return objective.loss_sums(logits_BxTxV, batch["targets"], batch["loss_mask"], token_bytes_V)
  h_BxTxD = model.apply(variables, *args, deterministic=deterministic, rngs=rngs,
                        method=hidden_states)
  head_fn = lambda h: model.apply(variables, h, method=type(model).head)
  return loss_sums(head_fn, h_BxTxD, batch["targets"], batch["loss_mask"], chunk_size, token_bytes_V)
