"""Pure train and eval steps.

`train_step(state, batch) -> (state, metrics)` after binding the static pieces with
`functools.partial`. Gradient accumulation is exact: each microbatch contributes the gradient of
its loss *sum*, and the total is divided once by the number of valid tokens in the whole batch,
so k microbatches with uneven masks give the same update as one large batch. The sum is kept in
float32 whatever `param_dtype` is (k bfloat16 additions would round small microbatch gradients
away), and the optimizer gets float32 gradients; params keep their dtype.

Batch fields (int32 [B,T] unless noted): inputs, targets, loss_mask (bool), segment_ids, positions;
pair batches of a cached reference also reference_logps (float32 [B], `batch.REFERENCE_LOGPS`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lmobjective import objective, preference

from lmobjective.batch import MODEL_FIELDS, REFERENCE_LOGPS  # noqa: F401 (re-exported: step.MODEL_FIELDS)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # base key for dropout; each step folds in its step number


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
               batch_shape: tuple[int, int]) -> TrainState:
  init_rng, dropout_rng = jax.random.split(rng)
  dummy = jnp.zeros(batch_shape, jnp.int32)
  params = nn.unbox(model.init(init_rng, dummy)["params"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=dropout_rng)


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


def _zeros_like_output(fn, *args):
  """Zeros with the structure, shapes and dtypes of `fn(*args)` (traced, never run)."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))


def _accumulate(loss_fn, params, micro_batches, step_rng, k: int):
  """(float32 sum of the microbatches' gradients, sum of their sums): `loss_fn(params, micro, rng)`
  -> (what to differentiate, sums), scanned over the k microbatches."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(carry, xs):
    grads_acc, sums_acc = carry
    micro, i = xs
    (_, sums), grads = grad_fn(params, micro, jax.random.fold_in(step_rng, i))
    add_f32 = lambda acc, g: acc + g.astype(jnp.float32)
    return (jax.tree.map(add_f32, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

  first = jax.tree.map(lambda x: x[0], micro_batches)
  zero_sums = _zeros_like_output(lambda p, m, r: loss_fn(p, m, r)[1], params, first, step_rng)
  zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (grad_sums, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), (micro_batches, jnp.arange(k)))
  return grad_sums, sums


def _apply(state: TrainState, tx, grad_sums, count) -> tuple[TrainState, dict]:
  """One optimizer update from summed gradients divided once by `count` (tokens, or pairs)."""
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  grads = jax.tree.map(lambda g: g / denom, grad_sums)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  # float32 grads would turn bf16 Adam moments into float32 ones (optax casts mu only when given a
  # mu_dtype): keep the dtypes init gave the state, so every step has one signature and checkpoints
  # restore as saved. A no-op for float32 params.
  opt_state = optax.tree.cast_like(opt_state, state.opt_state)
  params = optax.apply_updates(state.params, updates)
  metrics = {"grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates),
             "param_norm": optax.tree.norm(params)}
  lr = learning_rate(opt_state)
  if lr is not None:
    metrics["lr"] = lr
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


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
  sums = loss(policy, reference, preference.pair_valid(policy))
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


def learning_rate(opt_state) -> jax.Array | None:
  """The rate the last update used, as recorded by `optax.inject_hyperparams` (None if absent)."""
  has_hparams = lambda x: hasattr(x, "hyperparams")
  for node in jax.tree.leaves(opt_state, is_leaf=has_hparams):
    if has_hparams(node) and "learning_rate" in node.hyperparams:
      return node.hyperparams["learning_rate"]
  return None


def eval_step(params, batch: dict, *, model: nn.Module, token_bytes_V: jax.Array | None = None,
              loss_chunk_size: int = 0) -> objective.LossSums:
  """Loss sums on one batch (deterministic forward); add them up across batches and hosts.

  `loss_chunk_size` > 0 fuses the LM head with the loss in chunks of that many positions
  (`objective.score`): same sums, without materialising [B,T,V] logits.
  """
  return objective.loss_sums(objective.score(model, params, batch, chunk_size=loss_chunk_size),
                             token_bytes_V)
