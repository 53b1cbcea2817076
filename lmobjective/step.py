"""Pure train and eval steps.

`train_step(state, batch) -> (state, metrics)` after binding the static pieces with
`functools.partial`. Gradient accumulation is exact: each microbatch contributes the gradient of
its loss *sum*, and the total is divided once by the number of valid tokens in the whole batch,
so k microbatches with uneven masks give the same update as one large batch. The sum is kept in
float32 whatever `param_dtype` is (k bfloat16 additions would round small microbatch gradients
away), and the optimizer gets float32 gradients; params keep their dtype.

Batch fields (int32 [B,T] unless noted): inputs, targets, loss_mask (bool), segment_ids, positions.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lmobjective import objective

from lmobjective.batch import MODEL_FIELDS  # noqa: F401 (re-exported: step.MODEL_FIELDS)


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


def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, grad_accum_steps: int = 1,
               z_loss: float = 0.0, loss_chunk_size: int = 0) -> tuple[TrainState, dict]:
  deterministic = model.cfg.dropout == 0.0
  step_rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(_forward_sums, has_aux=True)
  micro_BxT = _split_microbatches({k: batch[k] for k in MODEL_FIELDS}, grad_accum_steps)

  def accumulate(carry, xs):
    grads_acc, sums_acc = carry
    micro, i = xs
    (_, sums), grads = grad_fn(state.params, model, micro, jax.random.fold_in(step_rng, i),
                               z_loss, deterministic, loss_chunk_size)
    add_f32 = lambda acc, g: acc + g.astype(jnp.float32)
    return (jax.tree.map(add_f32, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

  zero_sums = objective.LossSums(*(jnp.zeros((), jnp.float32),) * 5)._replace(
      num_tokens=jnp.zeros((), jnp.int32))
  zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  (grad_sums, sums), _ = jax.lax.scan(
      accumulate, (zero_grads, zero_sums), (micro_BxT, jnp.arange(grad_accum_steps)))

  denom = jnp.maximum(sums.num_tokens, 1).astype(jnp.float32)
  grads = jax.tree.map(lambda g: g / denom, grad_sums)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  # float32 grads would turn bf16 Adam moments into float32 ones (optax casts mu only when given a
  # mu_dtype): keep the dtypes init gave the state, so every step has one signature and checkpoints
  # restore as saved. A no-op for float32 params.
  opt_state = optax.tree.cast_like(opt_state, state.opt_state)
  params = optax.apply_updates(state.params, updates)
  # Sums beside num_tokens (the step's scored targets), so the host can weight a window of steps
  # by tokens; `loss` is this step's mean, which the NaN guard checks.
  metrics = {
      "loss": sums.loss_sum / denom,
      "z_sum": sums.z_sum,
      "correct_sum": sums.correct_sum,
      "num_tokens": sums.num_tokens,
      "grad_norm": optax.tree.norm(grads),
      "update_norm": optax.tree.norm(updates),
      "param_norm": optax.tree.norm(params),
  }
  lr = learning_rate(opt_state)
  if lr is not None:
    metrics["lr"] = lr
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


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
