"""A frozen copy of the train and eval steps as they were before the generic step (commit 5cd9cbc,
lmobjective/step.py): `train_step`/`eval_step` for next-token prediction and
`preference_train_step`/`preference_eval_step` for pairs. tests/test_generic_step.py runs them
beside today's `step.train_step`/`step.eval_step` in one process and asserts equal bits (golden
hashes would differ between CPUs). Do not edit: it is the reference, not library code. It shares
only the pieces the refactor did not touch: `next_token.score` and the sums, the preference losses,
`step._accumulate`/`_apply`/`_zeros_like_output`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lmobjective.batch import MODEL_FIELDS, REFERENCE_LOGPS
from lmobjective.objectives import next_token as objective
from lmobjective.objectives import preference
from lmobjective.step import TrainState, _accumulate, _apply, _zeros_like_output  # noqa: F401


def _forward_sums(params, model, micro, dropout_rng, z_loss, deterministic, loss_chunk_size=0):
  losses = objective.score(model, params, micro, chunk_size=loss_chunk_size, deterministic=deterministic,
                           rngs=None if deterministic else {"dropout": dropout_rng})
  sums = objective.loss_sums(losses)
  return objective.objective_sum(sums, z_loss), sums


def _split_microbatches(batch, k: int):
  """[B, ...] -> [k, B/k, ...], microbatch j = rows j, j+k, j+2k, ...

  Strided (not contiguous) so the leading, data-sharded axis stays the B/k one: every device
  holds a slice of every microbatch and the scan never gathers rows across devices.
  """
  return jax.tree.map(lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1), batch)


def _split_pairs(batch, k: int):
  """[2P, ...] (rows 2i, 2i+1 = pair i) -> [k, 2P/k, ...], microbatch j = pairs j, j+k, ...

  A pair is never split: both rows go to the same microbatch, and (the data axis being the
  leading one, in blocks of whole pairs) to the same device.
  """
  as_pairs = jax.tree.map(lambda x: x.reshape((x.shape[0] // 2, 2) + x.shape[1:]), batch)
  return jax.tree.map(lambda x: x.reshape((k, -1) + x.shape[3:]), _split_microbatches(as_pairs, k))


def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, grad_accum_steps: int = 1,
               z_loss: float = 0.0, loss_chunk_size: int = 0) -> tuple[TrainState, dict]:
  deterministic = model.cfg.dropout == 0.0
  loss_fn = lambda params, micro, rng: _forward_sums(params, model, micro, rng, z_loss, deterministic,
                                                     loss_chunk_size)
  micro_BxT = _split_microbatches({k: batch[k] for k in MODEL_FIELDS}, grad_accum_steps)
  grad_sums, sums = _accumulate(loss_fn, state.params, micro_BxT, jax.random.fold_in(state.rng, state.step),
                                grad_accum_steps)
  new_state, norms = _apply(state, tx, grad_sums, sums.num_tokens)
  # Sums beside num_tokens (the step's scored targets), so the host can weight a window of steps
  # by tokens; `loss` is this step's mean, which the NaN guard checks.
  metrics = {"loss": sums.loss_sum / jnp.maximum(sums.num_tokens, 1).astype(jnp.float32),
             "z_sum": sums.z_sum, "correct_sum": sums.correct_sum, "num_tokens": sums.num_tokens, **norms}
  return new_state, metrics


# ---- preference objectives (pairs: rows 2i, 2i+1 = chosen, rejected of pair i) -------------------


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
  """Which preference loss and its settings (`config.objective`); `needs_reference` is False for SimPO."""
  kind: str
  beta: float
  label_smoothing: float = 0.0
  gamma: float = 0.0
  rpo_alpha: float = 0.0

  @property
  def needs_reference(self) -> bool:
    return self.kind != "simpo"

  def __call__(self, policy, reference, pair_valid_P) -> preference.PreferenceSums:
    return preference.preference_loss(self.kind, policy, reference, pair_valid_P, beta=self.beta,
                                      label_smoothing=self.label_smoothing, gamma=self.gamma, rpo_alpha=self.rpo_alpha)


def _pair_logps(model, params, micro, loss_chunk_size, deterministic=True, rngs=None):
  """The model's `PairLogps` on a pair batch, through `objective.score` (the one path to the logits)."""
  losses = objective.score(model, params, micro, chunk_size=loss_chunk_size, deterministic=deterministic,
                           rngs=rngs)
  return preference.pair_logps(losses, micro["loss_mask"]), losses


def _pair_fields(batch: dict) -> tuple[str, ...]:
  """The fields a preference step reads: the model's, and the cached reference's log-probs when present."""
  return MODEL_FIELDS + ((REFERENCE_LOGPS,) if REFERENCE_LOGPS in batch else ())


def _reference(model, reference_params, micro, policy: preference.PairLogps, loss_chunk_size: int):
  """The frozen reference's `PairLogps`: the batch's cached values when it has them (made before training by
  this same `_pair_logps` on the same rows: run/reference_cache.py), else a forward of `reference_params`."""
  if REFERENCE_LOGPS in micro:
    return preference.pair_logps_of_rows(micro[REFERENCE_LOGPS], policy)
  if reference_params is None:
    raise ValueError("a reference loss needs reference_params or the batch's reference_logps")
  return _pair_logps(model, jax.lax.stop_gradient(reference_params), micro, loss_chunk_size)[0]


def _preference_sums(params, reference_params, micro, rng, *, model, loss: PreferenceLoss,
                     loss_chunk_size: int, deterministic: bool):
  """(loss sum over pairs, (PreferenceSums, scored response tokens)) of one microbatch of pairs."""
  policy, losses = _pair_logps(model, params, micro, loss_chunk_size, deterministic,
                               None if deterministic else {"dropout": rng})
  reference = None
  if loss.needs_reference:  # frozen: no gradient flows into it
    reference = _reference(model, reference_params, micro, policy, loss_chunk_size)
  sums = loss(policy, reference, preference.pair_valid(policy))  # (no tie check then)
  return sums.loss_sum, (sums, losses.valid.sum(dtype=jnp.int32))


def preference_train_step(state: TrainState, batch: dict, reference_params=None, *, model: nn.Module,
                          tx: optax.GradientTransformation, loss: PreferenceLoss, grad_accum_steps: int = 1,
                          loss_chunk_size: int = 0) -> tuple[TrainState, dict]:
  """One update on a batch of 2P rows (P pairs); the gradient of the loss summed over pairs,
  divided once by the batch's valid pairs (exact under accumulation, like tokens for next-token).
  The reference: the batch's reference_logps when it has them, else `reference_params` (live)."""
  deterministic = model.cfg.dropout == 0.0
  loss_fn = lambda params, micro, rng: _preference_sums(
      params, reference_params, micro, rng, model=model, loss=loss, loss_chunk_size=loss_chunk_size,
      deterministic=deterministic)
  micro = _split_pairs({k: batch[k] for k in _pair_fields(batch)}, grad_accum_steps)
  grad_sums, (sums, num_tokens) = _accumulate(loss_fn, state.params, micro,
                                              jax.random.fold_in(state.rng, state.step), grad_accum_steps)
  new_state, norms = _apply(state, tx, grad_sums, sums.num_pairs)
  metrics = {"loss": sums.loss_sum / jnp.maximum(sums.num_pairs, 1).astype(jnp.float32),
             **sums._asdict(), "num_tokens": num_tokens, **norms}
  return new_state, metrics


def preference_eval_step(params, batch: dict, reference_params=None, *, model: nn.Module, loss: PreferenceLoss,
                         loss_chunk_size: int = 0) -> tuple[preference.PreferenceSums, preference.AccuracySums]:
  """The loss's sums and the reference-free preference accuracy on one batch of pairs (the reference as
  in `preference_train_step`)."""
  policy, _ = _pair_logps(model, params, batch, loss_chunk_size)
  reference = _reference(model, reference_params, batch, policy, loss_chunk_size) if loss.needs_reference else None
  valid_P = preference.pair_valid(policy)
  return loss(policy, reference, valid_P), preference.preference_accuracy(policy, valid_P)


def eval_step(params, batch: dict, *, model: nn.Module, token_bytes_V: jax.Array | None = None,
              loss_chunk_size: int = 0) -> objective.LossSums:
  """Loss sums on one batch (deterministic forward); add them up across batches and hosts.

  `loss_chunk_size` > 0 fuses the LM head with the loss in chunks of that many positions
  (`objective.score`): same sums, without materialising [B,T,V] logits.
  """
  return objective.loss_sums(objective.score(model, params, batch, chunk_size=loss_chunk_size),
                             token_bytes_V)
