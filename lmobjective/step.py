"""Pure train and eval steps, one of each for every objective (`objectives.Objective`).

`train_step(state, batch) -> (state, metrics)` after binding the static pieces (the model, the
optimizer, the objective) with `functools.partial`. Gradient accumulation is exact: each
microbatch contributes the gradient of its loss *sum*, and the total is divided once by the
objective's count (valid tokens, valid pairs) in the whole batch, so k microbatches with uneven
masks give the same update as one large batch; the objective's groups (a pair's two rows) are
never split across microbatches or devices. The sum is kept in
float32 whatever `param_dtype` is (k bfloat16 additions would round small microbatch gradients
away), and the optimizer gets float32 gradients; params keep their dtype.

Batch fields (int32 [B,T] unless noted): inputs, targets, loss_mask (bool), segment_ids, positions;
pair batches of a cached reference also reference_logps (float32 [B], `batch.REFERENCE_LOGPS`).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lmobjective.batch import MARGIN, MODEL_FIELDS, REFERENCE_LOGPS  # noqa: F401 (re-exported: step.MODEL_FIELDS)
from lmobjective.objectives import Objective


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # base key for dropout; each step folds in its step number


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
               batch_shape: tuple[int, int]) -> TrainState:
  init_rng, dropout_rng = jax.random.split(rng)
  params = init_params(model, init_rng, batch_shape)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=dropout_rng)


def init_params(model: nn.Module, init_rng: jax.Array, batch_shape: tuple[int, int]):
  """The model's freshly initialised params (unboxed) from `init_rng`."""
  return nn.unbox(model.init(init_rng, jnp.zeros(batch_shape, jnp.int32))["params"])


def _split_groups(batch, k: int, group_size: int = 1):
  """[B, ...] -> [k, B/k, ...]: microbatch j = groups j, j+k, j+2k, ... of `group_size` consecutive rows.

  A group (a pair's two rows, k samples of one prompt) is never split: its rows go to the same
  microbatch and, the data axis being the leading one in blocks of whole groups, to the same device.
  Strided (not contiguous) so the leading, data-sharded axis stays the B/k one: every device holds a
  slice of every microbatch and the scan never gathers rows across devices.
  """
  strided = lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
  if group_size == 1:
    return jax.tree.map(strided, batch)
  as_groups = jax.tree.map(lambda x: x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:]), batch)
  return jax.tree.map(lambda x: strided(x).reshape((k, -1) + x.shape[2:]), as_groups)


def _zeros_like_output(fn, *args):
  """Zeros with the structure, shapes and dtypes of `fn(*args)` (traced, never run)."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))


def _accumulate(loss_fn, params, micro_batches, step_rng, k: int, objective: Objective | None = None):
  """(float32 sum of the microbatches' gradients, their sums combined): `loss_fn(params, micro, rng)`
  -> (what to differentiate, sums), scanned over the k microbatches; `objective.combine` joins the sums
  (added, or e.g. a minimum for an extreme), starting from `objective.empty` (None: added, from zeros)."""
  combine = objective.combine if objective is not None else lambda a, b: jax.tree.map(jnp.add, a, b)
  empty = objective.empty if objective is not None else lambda zeros: zeros
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(carry, xs):
    grads_acc, sums_acc = carry
    micro, i = xs
    (_, sums), grads = grad_fn(params, micro, jax.random.fold_in(step_rng, i))
    add_f32 = lambda acc, g: acc + g.astype(jnp.float32)
    return (jax.tree.map(add_f32, grads_acc, grads), combine(sums_acc, sums)), None

  first = jax.tree.map(lambda x: x[0], micro_batches)
  zero_sums = empty(_zeros_like_output(lambda p, m, r: loss_fn(p, m, r)[1], params, first, step_rng))
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


def train_step(state: TrainState, batch: dict, reference_params=None, *, model: nn.Module,
               tx: optax.GradientTransformation, objective: Objective,
               grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
  """One update of any objective: the gradient of its loss *sum* over each microbatch (groups kept
  whole), added in float32 and divided once by `objective.denominator` of the whole batch's sums.
  `reference_params`: a live frozen reference (else the batch carries its values, or there is none)."""
  deterministic = model.cfg.dropout == 0.0
  loss_fn = lambda params, micro, rng: objective.loss(model, params, micro, rng, reference_params, deterministic)
  micro = _split_groups({k: batch[k] for k in objective.fields}, grad_accum_steps, objective.group_size)
  grad_sums, sums = _accumulate(loss_fn, state.params, micro, jax.random.fold_in(state.rng, state.step),
                                grad_accum_steps, objective)
  new_state, norms = _apply(state, tx, grad_sums, objective.denominator(sums))
  return new_state, {**objective.step_metrics(sums), **norms}


def eval_step(params, batch: dict, reference_params=None, *, model: nn.Module, objective: Objective,
              token_bytes_V: jax.Array | None = None):
  """The objective's sums on one eval batch (deterministic forward); add them up across batches and
  hosts, then `objective.eval_record`. `token_bytes_V` (bytes per token id) gives bits per byte."""
  return objective.eval_sums(model, params, {k: batch[k] for k in objective.fields}, reference_params,
                             token_bytes_V)


def learning_rate(opt_state) -> jax.Array | None:
  """The rate the last update used, as recorded by `optax.inject_hyperparams` (None if absent)."""
  has_hparams = lambda x: hasattr(x, "hyperparams")
  for node in jax.tree.leaves(opt_state, is_leaf=has_hparams):
    if has_hparams(node) and "learning_rate" in node.hyperparams:
      return node.hyperparams["learning_rate"]
  return None
