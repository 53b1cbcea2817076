"""The objective: masked next-token cross-entropy, and the numbers researchers read off it.

Teacher forcing happens once, in the batch (`inputs = tokens[:, :-1]`, `targets = tokens[:, 1:]`);
nothing here shifts. A target counts when `mask` is true AND the target id is >= 0 (so the
`-100` ignore convention works with or without a mask). Losses are returned as a *sum* and a
*count* so that means are token-weighted across sequences, microbatches, devices and hosts:
add the sums, add the counts, divide once.

Shape legend: B batch, T positions, V vocabulary.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = -100
LN2 = math.log(2.0)


def valid_targets(targets_BxT: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
  """Boolean [B,T]: positions whose target is scored."""
  valid = targets_BxT >= 0
  if mask_BxT is not None:
    valid = valid & mask_BxT.astype(bool)
  return valid


class TokenLosses(NamedTuple):
  """Per-position view of the objective (all float32 [B,T]; zeros where not valid)."""
  nll: jax.Array  # -log p(target)
  p_target: jax.Array  # p(target) = exp(-nll)
  log_z: jax.Array  # logsumexp of the logits (for z-loss)
  correct: jax.Array  # 1.0 where argmax == target
  valid: jax.Array  # bool


def token_losses(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                 mask_BxT: jax.Array | None = None) -> TokenLosses:
  """-log p(target) at every position, computed with a float32 log-softmax."""
  valid_BxT = valid_targets(targets_BxT, mask_BxT)
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  safe_targets_BxT = jnp.where(valid_BxT, targets_BxT, 0)
  log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, safe_targets_BxT[..., None], axis=-1)[..., 0]
  nll_BxT = jnp.where(valid_BxT, log_z_BxT - target_logit_BxT, 0.0)
  correct_BxT = jnp.where(valid_BxT, jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT, False)
  return TokenLosses(
      nll=nll_BxT, p_target=jnp.where(valid_BxT, jnp.exp(-nll_BxT), 0.0),
      log_z=jnp.where(valid_BxT, log_z_BxT, 0.0), correct=correct_BxT.astype(jnp.float32),
      valid=valid_BxT)


def accurate_sum(values: jax.Array, valid: jax.Array) -> jax.Array:
  """float32 sum of `values` over `valid`, accurate to about one rounding of the result.

  A plain float32 reduction of thousands of losses near ln V drifts by ~1e-7 relative, which is
  ~1e-6 nats on the mean. Summing deviations from a first-pass mean keeps the partial sums
  small, so only the final `mean * count + residual` rounds at the scale of the total.
  """
  count = valid.sum(dtype=jnp.int32).astype(jnp.float32)
  values = jnp.where(valid, values, 0.0)
  centre = jax.lax.stop_gradient(values.sum() / jnp.maximum(count, 1.0))
  residual = jnp.where(valid, values - centre, 0.0).sum()
  return centre * count + residual


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Masked next-token cross-entropy as `(loss_sum, num_tokens)`.

  Args:
    logits: [..., V] in any float dtype; the log-softmax runs in float32.
    targets: [...] int ids; negative ids (e.g. -100) are ignored.
    mask: optional [...] bool/0-1; false positions are ignored.
  Returns:
    loss_sum: float32 sum of -log p(target) over valid positions (0.0 if none).
    num_tokens: int32 count of valid positions. `loss_sum / num_tokens` is the mean loss in nats.
  """
  losses = token_losses(logits, targets, mask)
  return accurate_sum(losses.nll, losses.valid), losses.valid.sum(dtype=jnp.int32)


class LossSums(NamedTuple):
  """Sums over valid tokens; add them across microbatches/devices, then call `summarize`."""
  loss_sum: jax.Array  # sum of -log p(target), nats
  num_tokens: jax.Array
  z_sum: jax.Array  # sum of logsumexp^2
  correct_sum: jax.Array
  bytes_sum: jax.Array  # UTF-8 bytes the valid targets stand for (0 if unknown)


def loss_sums(logits_BxTxV, targets_BxT, mask_BxT=None, token_bytes_V=None) -> LossSums:
  losses = token_losses(logits_BxTxV, targets_BxT, mask_BxT)
  if token_bytes_V is None:
    bytes_sum = jnp.zeros((), jnp.float32)
  else:
    safe = jnp.where(losses.valid, targets_BxT, 0)
    bytes_sum = jnp.where(losses.valid, token_bytes_V[safe], 0).sum().astype(jnp.float32)
  return LossSums(
      loss_sum=accurate_sum(losses.nll, losses.valid), num_tokens=losses.valid.sum(dtype=jnp.int32),
      z_sum=jnp.square(losses.log_z).sum(), correct_sum=losses.correct.sum(), bytes_sum=bytes_sum)


def training_loss(sums: LossSums, z_loss: float) -> jax.Array:
  """Mean token loss plus optional z-loss; an all-masked batch gives 0 (not NaN)."""
  n = jnp.maximum(sums.num_tokens, 1).astype(jnp.float32)
  return (sums.loss_sum + z_loss * sums.z_sum) / n


def summarize(loss_sum, num_tokens, bytes_sum=None, correct_sum=None) -> dict[str, float]:
  """Host-side metrics from sums: loss (nats), perplexity, bits per token, bits per byte, accuracy.

  Returns NaN-free numbers: with no valid tokens, loss is reported as NaN explicitly and the
  caller decides; it is never averaged in silently.
  """
  loss_sum, num_tokens = float(loss_sum), int(num_tokens)
  if num_tokens == 0:
    return {"loss": float("nan"), "num_tokens": 0}
  loss = loss_sum / num_tokens
  out = {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0))),
         "bits_per_token": loss / LN2, "num_tokens": num_tokens}
  if bytes_sum is not None and float(bytes_sum) > 0:
    out["bits_per_byte"] = loss_sum / LN2 / float(bytes_sum)
  if correct_sum is not None:
    out["accuracy"] = float(correct_sum) / num_tokens
  return out
