"""Optimizer: clip_by_global_norm -> AdamW (masked weight decay), or Muon for the hidden matrices and
AdamW for the rest (`optimizer.kind`), driven by a warmup+decay schedule."""

from __future__ import annotations

import jax
import optax
from jax.sharding import PartitionSpec as P

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


def muon_dimension_numbers(param_axes):
  """Per parameter: how Muon sees it as a matrix, or None for the parameters AdamW keeps.

  `param_axes`: the params' logical axis names, a PartitionSpec per leaf (`sharding.logical_axes`).
  Muon gets every hidden matrix: the kernels without a `vocab` axis (the LM head and embedding
  tables are vocabulary lookups, not hidden maps; norm scales and biases are not matrices). Each
  maps the residual stream (`embed`) to heads or MLP units or back, so the reduction (fan-in) axes
  are `embed` when it comes first, else every axis before it: q/k/v [D, N, H] -> ((0,), (1, 2)),
  out [N, H, D] -> ((0, 1), (2,)). A `layers` axis (model.scan_layers) is a batch axis: each
  layer's matrix is orthogonalised on its own.
  """

  def dims(path, spec):
    names = tuple(spec)
    if str(getattr(path[-1], "key", path[-1])) != "kernel" or "vocab" in names:
      return None
    axes = [i for i, n in enumerate(names) if n != "layers"]
    if names[axes[0]] == "embed":
      return optax.contrib.MuonDimensionNumbers(tuple(axes[:1]), tuple(axes[1:]))
    if names[axes[-1]] == "embed":
      return optax.contrib.MuonDimensionNumbers(tuple(axes[:-1]), tuple(axes[-1:]))
    raise ValueError(f"{jax.tree_util.keystr(path)}: a kernel with logical axes {names} maps neither from "
                     "nor to embed: no rule says which of its axes Muon should reduce")

  return jax.tree_util.tree_map_with_path(dims, param_axes, is_leaf=lambda x: isinstance(x, P))


_is_dims = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)


def _adamw(opt: OptimizerConfig, total_steps: int | None) -> optax.GradientTransformation:
  mask = lambda p: weight_decay_mask(p, opt.decay_embeddings, opt.decay_norms_and_biases)
  # static_args: without it inject_hyperparams calls the mask like a schedule, mask(step), and
  # silently turns weight decay off everywhere.
  return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
      weight_decay=opt.weight_decay, mask=mask)


def _muon_and_adamw(opt: OptimizerConfig, total_steps: int | None, dims) -> optax.GradientTransformation:
  """optax.contrib.muon on the leaves `dims` gives numbers for, `_adamw` on the others (dims None).

  Not muon's own AdamW for the rest: that one uses Muon's Nesterov flag (NAdamW) and decays every
  leaf it gets. So an `optax.partition` routes, and muon's AdamW is handed no leaf at all.
  """
  labels = jax.tree.map(lambda d: "adam" if d is None else "muon", dims, is_leaf=_is_dims)
  # ns_steps is a loop bound and must stay a Python int; the dims tree is not a hyperparameter.
  muon = optax.inject_hyperparams(optax.contrib.muon, static_args=("ns_steps", "muon_weight_dimension_numbers"))(
      learning_rate=learning_rate_schedule(opt, total_steps, peak=opt.muon_learning_rate),
      beta=opt.muon_momentum, weight_decay=opt.muon_weight_decay, eps=opt.eps, nesterov=True,
      muon_weight_dimension_numbers=dims)
  return optax.partition({"adam": _adamw(opt, total_steps), "muon": muon}, labels)


def make_optimizer(opt: OptimizerConfig, total_steps: int | None = None,
                   param_axes=None) -> optax.GradientTransformation:
  """`total_steps` (train.steps) is the decay length when optimizer.decay_steps is None.
  `param_axes` (optimizer.kind=muon only): the params' logical axis names, `sharding.logical_axes(model)`."""
  if opt.kind == "muon":
    if param_axes is None:
      raise ValueError("optimizer.kind='muon' needs the params' logical axes (param_axes)")
    tx = _muon_and_adamw(opt, total_steps, muon_dimension_numbers(param_axes))
  else:
    tx = _adamw(opt, total_steps)
  return optax.chain(optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity(), tx)

