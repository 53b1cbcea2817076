"""Optimizer: clip_by_global_norm -> AdamW (masked weight decay) driven by a warmup+decay schedule."""

from __future__ import annotations

import jax
import optax

from lmobjective.config import OptimizerConfig, wsd_decay_steps


def learning_rate_schedule(opt: OptimizerConfig, total_steps: int | None = None,
                           peak: float | None = None) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine/linear decay to `end_learning_rate`.

  Warmup is `peak * (step + 1) / warmup_steps`, so the very first update is not a no-op.

  `decay_steps` counts from step 0 and includes warmup (optax convention); after it the rate stays
  at `end_learning_rate`. `constant` holds the peak after warmup; `wsd` holds it until the last
  `decay_fraction` of decay_steps, then decays linearly to `end_learning_rate`.
  `peak` given: the same schedule scaled by peak / learning_rate (Muon's group).
  """
  warm = opt.warmup_steps
  peak, end = (opt.learning_rate, opt.end_learning_rate) if peak is None else (
      peak, opt.end_learning_rate * peak / opt.learning_rate if opt.learning_rate else 0.0)
  decay_steps = opt.decay_steps if opt.decay_steps is not None else total_steps
  if decay_steps is None:
    raise ValueError("optimizer.decay_steps is None: pass total_steps (train.steps)")
  decay = max(decay_steps - warm, 1)
  warmup = lambda step: peak * (step + 1) / warm
  if opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, decay, alpha=end / peak if peak else 0.0)
  elif opt.schedule == "linear":
    main = optax.linear_schedule(peak, end, decay)
  elif opt.schedule == "wsd":
    main = _stable_then_decay(peak, end, decay_steps - warm, wsd_decay_steps(opt.decay_fraction, decay_steps))
  else:
    main = optax.constant_schedule(peak)
  if warm == 0:
    return main
  return optax.join_schedules([warmup, main], [warm])


def _stable_then_decay(peak: float, end: float, steps: int, cooldown: int) -> optax.Schedule:
  """`peak` for `steps - cooldown` steps, then linear to `end` over `cooldown` steps (then `end`)."""
  if cooldown <= 0:
    return optax.constant_schedule(peak)
  return optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, end, cooldown)],
                              [steps - cooldown])


def weight_decay_mask(params, decay_embeddings: bool = False, decay_norms_and_biases: bool = False):
  """True where weight decay applies: kernels, but not norm scales, biases or embedding tables by default."""

  def decays(path, leaf) -> bool:
    del leaf  # decided by name: attention biases are 2-D ([heads, head_dim]) but still biases
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-1] in ("bias", "scale"):
      return decay_norms_and_biases
    if names[-1] == "embedding":
      return decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


_INJECT_STATES = (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)


def skipped_update_state(old_state, new_state):
  """The optimizer state after an update that was skipped (a non-finite step, nan_policy='skip').

  The learning rate is a function of the data step: step s uses lr(s) whether or not earlier steps
  were skipped. So each `inject_hyperparams` state takes its step count and schedule states from
  `new_state` (the update that was computed and thrown away), and keeps the inner state of
  `old_state`: Adam's moments and bias-correction count stay as they were, since nothing moved.
  (The schedule's own counter lives in `hyperparams_states`, not only in `count`.)
  """
  is_inject = lambda x: isinstance(x, _INJECT_STATES)
  keep_inner = lambda old, new: new._replace(inner_state=old.inner_state) if is_inject(old) else old
  return jax.tree.map(keep_inner, old_state, new_state, is_leaf=is_inject)


def make_optimizer(opt: OptimizerConfig, total_steps: int | None = None) -> optax.GradientTransformation:
  """`total_steps` (train.steps) is the decay length when optimizer.decay_steps is None."""
  mask = lambda p: weight_decay_mask(p, opt.decay_embeddings, opt.decay_norms_and_biases)
  # static_args: without it inject_hyperparams calls the mask like a schedule, mask(step), and
  # silently turns weight decay off everywhere.
  adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
      weight_decay=opt.weight_decay, mask=mask)
  if opt.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw)
  return optax.chain(optax.identity(), adamw)

