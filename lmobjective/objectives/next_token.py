"""Next-token prediction (pretraining, and SFT through its loss mask): masked cross-entropy, and
the one way from a model to its per-token losses, which every objective scores through.

`score(model, params, batch)` is the one entry point from a model to its losses: per-token
`TokenLosses` (dense, or chunked so [B,T,V] logits never exist), which `loss_sums`,
`sequence_logps` (a sequence's summed response log-prob: preference pairs, the reference cache,
evaluation, rollouts) and the position bins reduce. `NextToken` is the objective behind the
generic step (`objectives/interface.py`). Teacher forcing happens once, in the batch (`inputs = tokens[:, :-1]`, `targets = tokens[:, 1:]`);
nothing here shifts. A target counts when `mask` is true AND the target id is >= 0 (so the
`-100` ignore convention works with or without a mask). Losses are returned as a *sum* and a
*count* so that means are token-weighted across sequences, microbatches, devices and hosts:
add the sums, add the counts, divide once.

Shape legend: B batch, T positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmobjective.batch import IGNORE_INDEX  # noqa: F401 (re-exported: next_token.IGNORE_INDEX)
from lmobjective.config import require_float
from lmobjective.objectives import chunked, interface

LN2 = math.log(2.0)


def valid_targets(targets_BxT: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
  """Boolean [B,T]: positions whose target is scored."""
  valid = targets_BxT >= 0
  if mask_BxT is not None:
    valid = valid & mask_BxT.astype(bool)
  return valid


class TokenLosses(NamedTuple):
  """Per-position view of the objective (float32 [B,T]; zeros where not valid)."""
  nll: jax.Array  # -log p(target); the per-token log-probability is -nll
  p_target: jax.Array  # p(target) = exp(-nll)
  log_z: jax.Array  # logsumexp of the logits (for z-loss)
  correct: jax.Array  # 1.0 where argmax == target
  valid: jax.Array  # bool: the target is scored
  target: jax.Array  # int32 target ids, 0 where not valid (safe to index with)


def token_losses(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                 mask_BxT: jax.Array | None = None) -> TokenLosses:
  """-log p(target) at every position of `logits`, computed with a float32 log-softmax."""
  valid_BxT = valid_targets(targets_BxT, mask_BxT)
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  safe_targets_BxT = jnp.where(valid_BxT, targets_BxT, 0).astype(jnp.int32)
  log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, safe_targets_BxT[..., None], axis=-1)[..., 0]
  nll_BxT = jnp.where(valid_BxT, log_z_BxT - target_logit_BxT, 0.0)
  correct_BxT = jnp.where(valid_BxT, jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT, False)
  return TokenLosses(
      nll=nll_BxT, p_target=jnp.where(valid_BxT, jnp.exp(-nll_BxT), 0.0),
      log_z=jnp.where(valid_BxT, log_z_BxT, 0.0), correct=correct_BxT.astype(jnp.float32),
      valid=valid_BxT, target=safe_targets_BxT)


def score(model, params, batch: dict, *, chunk_size: int = 0, deterministic: bool = True,
          rngs=None) -> TokenLosses:
  """The one way from a model to its losses: `TokenLosses` of `model` on `batch`.

  Every caller (train and eval steps, loss by position, `evaluate`, the notebook, the coming
  preference objectives) goes through here. The model gives final hidden states
  (`Transformer.hidden_states`); its `head` turns them into logits. With `chunk_size` > 0 the
  head and the loss run `chunk_size` positions at a time (`chunked.map_chunks`), so no
  program holds more than [B, chunk_size, V] logits, and the result (and its gradient) is the
  dense one up to float rounding.

  Args:
    batch: `inputs`, `targets`, `positions`, `segment_ids` [B,T] and optional `loss_mask`.
  """
  variables = {"params": params}
  h_BxTxD = model.apply(variables, batch["inputs"], batch["positions"], batch["segment_ids"],
                        deterministic=deterministic, rngs=rngs, method="hidden_states")
  head = lambda h: model.apply(variables, h, method="head")
  return head_token_losses(head, h_BxTxD, batch["targets"], batch.get("loss_mask"), chunk_size)


def head_token_losses(head_fn: Callable[[jax.Array], jax.Array], h_BxTxD: jax.Array,
                      targets_BxT: jax.Array, mask_BxT: jax.Array | None = None,
                      chunk_size: int = 0) -> TokenLosses:
  """`token_losses(head_fn(h), ...)`, in chunks of `chunk_size` positions when > 0 (same values)."""
  if not chunk_size:
    return token_losses(head_fn(h_BxTxD), targets_BxT, mask_BxT)
  valid_BxT = valid_targets(targets_BxT, mask_BxT)
  chunk = lambda h_BxCxD, t_BxC, v_BxC: token_losses(head_fn(h_BxCxD), t_BxC, v_BxC)
  return chunked.map_chunks(chunk, h_BxTxD, (targets_BxT, valid_BxT), chunk_size)


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


class LossSums(NamedTuple):
  """Sums over valid tokens; add them across microbatches/devices, then call `summarize`."""
  loss_sum: jax.Array  # sum of -log p(target), nats
  num_tokens: jax.Array  # scored targets
  z_sum: jax.Array  # sum of logsumexp^2
  correct_sum: jax.Array
  bytes_sum: jax.Array  # UTF-8 bytes the valid targets stand for (0 if unknown)


def loss_sums(losses: TokenLosses, token_bytes_V: jax.Array | None = None) -> LossSums:
  """The batch's sums; `token_bytes_V` (bytes per token id) gives bits per byte."""
  if token_bytes_V is None:
    bytes_sum = jnp.zeros((), jnp.float32)
  else:
    bytes_sum = jnp.where(losses.valid, token_bytes_V[losses.target], 0).sum().astype(jnp.float32)
  return LossSums(
      loss_sum=accurate_sum(losses.nll, losses.valid), num_tokens=losses.valid.sum(dtype=jnp.int32),
      z_sum=jnp.square(losses.log_z).sum(), correct_sum=losses.correct.sum(), bytes_sum=bytes_sum)


def objective_sum(sums: LossSums, z_loss: float) -> jax.Array:
  """What training differentiates: the loss sum plus z-loss; divided once by the batch's tokens."""
  return sums.loss_sum + z_loss * sums.z_sum


def sequence_sums(losses: TokenLosses, mask_BxT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Per row: (sum of log p(target), number of scored targets) over valid positions AND `mask`.

  The log-probability of a response given its prompt is this sum with `mask` on the response
  tokens (prompt tokens are never scored); divide by the count for the length-normalised mean.
  """
  keep_BxT = losses.valid if mask_BxT is None else losses.valid & mask_BxT.astype(bool)
  logp_B = jnp.where(keep_BxT, -losses.nll, 0.0).sum(axis=-1)
  return logp_B, keep_BxT.sum(axis=-1, dtype=jnp.int32)


class SequenceLogps(NamedTuple):
  """Per row: the summed log-probability of its scored targets and how many there are (float32/int32 [B])."""
  logp: jax.Array  # log π(response | prompt): the sum of log p(target) over the row's scored targets
  num_tokens: jax.Array  # scored targets (the response's length; 0 on a padding row)


def sequence_logps(model, params, batch: dict, *, chunk_size: int = 0, deterministic: bool = True,
                   rngs=None) -> SequenceLogps:
  """The one function for a model's per-sequence log-probs of response tokens: `score`, summed per row
  over the targets `batch["loss_mask"]` marks (the response; prompt targets are never scored, so
  they change neither the value nor its gradient). Preference steps, the reference cache,
  evaluation and the notebook all call it."""
  losses = score(model, params, batch, chunk_size=chunk_size, deterministic=deterministic, rngs=rngs)
  logp_B, n_B = sequence_sums(losses, batch["loss_mask"])
  return SequenceLogps(logp_B, n_B)


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Masked next-token cross-entropy of `logits` as `(loss_sum, num_tokens)`.

  Args:
    logits: [B, T, V] in any float dtype; the log-softmax runs in float32.
    targets: [B, T] int ids; negative ids (e.g. -100) are ignored.
    mask: optional [B, T] bool/0-1; false positions are ignored.
  Returns:
    loss_sum: float32 sum of -log p(target) over valid positions (0.0 if none).
    num_tokens: int32 count of valid positions. `loss_sum / num_tokens` is the mean loss in nats.
  """
  sums = loss_sums(token_losses(logits, targets, mask))
  return sums.loss_sum, sums.num_tokens


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


# ---- the objective -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NextToken(interface.Objective):
  """Masked next-token cross-entropy, summed over scored tokens and divided once by their number;
  plus `z_loss` times the sum of logsumexp² (PaLM's z-loss). SFT is this objective on chat sources
  whose loss mask keeps the assistant's tokens."""
  kind: str = "next_token"
  z_loss: float = 0.0

  keys: ClassVar[tuple[str, ...]] = ("z_loss",)

  @classmethod
  def validate(cls, cfg) -> None:
    require_float(cfg, "objective.z_loss", 0.0)

  def loss(self, model, params, micro, rng, reference_params, deterministic):
    losses = score(model, params, micro, chunk_size=self.loss_chunk_size, deterministic=deterministic,
                   rngs=None if deterministic else {"dropout": rng})
    sums = loss_sums(losses)
    return objective_sum(sums, self.z_loss), sums

  def denominator(self, sums: LossSums):
    return sums.num_tokens

  def step_metrics(self, sums: LossSums):
    # Sums beside num_tokens (the step's scored targets), so the host can weight a window of steps
    # by tokens; `loss` is this step's mean, which the NaN guard checks.
    return {"loss": sums.loss_sum / jnp.maximum(sums.num_tokens, 1).astype(jnp.float32),
            "z_sum": sums.z_sum, "correct_sum": sums.correct_sum, "num_tokens": sums.num_tokens}

  def eval_sums(self, model, params, batch, reference_params, token_bytes_V):
    return loss_sums(score(model, params, batch, chunk_size=self.loss_chunk_size), token_bytes_V)

  def eval_record(self, per_source):
    """val_loss, val_perplexity, val_bits_per_token, val_bits_per_byte overall (token-weighted) and
    val_loss/<source>, val_bits_per_byte/<source> per source."""
    out, totals = {}, np.zeros(3)
    for name, s in per_source.items():
      sums = np.array([s.loss_sum, s.num_tokens, s.bytes_sum])
      m = summarize(*sums)
      out[f"val_loss/{name}"] = m["loss"]
      if "bits_per_byte" in m:
        out[f"val_bits_per_byte/{name}"] = m["bits_per_byte"]
      totals += sums
    if totals[1] > 0:
      m = summarize(*totals)
      out.update(val_loss=m["loss"], val_perplexity=m["perplexity"], val_bits_per_token=m["bits_per_token"],
                 val_bits_per_byte=m.get("bits_per_byte"))
    return {k: v for k, v in out.items() if v is not None}

  def train_record(self, metrics):
    """train_loss and train_accuracy per scored token of the window (z_loss too when it is on)."""
    n = np.array([m["num_tokens"] for m in metrics], np.float64)
    per_token = lambda key: interface.window_sum(metrics, key) / max(n.sum(), 1)
    rec = {"train_loss": float((np.array([m["loss"] for m in metrics]) * n).sum() / max(n.sum(), 1)),
           "train_accuracy": per_token("correct_sum")}
    if self.z_loss > 0:
      rec["z_loss"] = per_token("z_sum")
    return rec

  def restored_metrics(self, metrics):
    """A checkpoint saved before steps reported `correct_sum` and `z_sum` has the step's means
    `accuracy` and `z_loss`: the sums, so a resumed run can weight its window."""
    if "correct_sum" in metrics:
      return metrics
    out = dict(metrics)
    n = np.float32(out["num_tokens"])
    out["correct_sum"], out["z_sum"] = out.pop("accuracy") * n, out.pop("z_loss") * n
    return out
