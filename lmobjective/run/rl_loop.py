"""Reward maximisation's loop (objective.kind rloo | grpo | reinforce): iterations, checkpoints, resume.

`run_owned` is `train.run` of an RL objective: build (`rollout.build`), restore or init, then for each
iteration `rollout.collect` (sample, score, advantages) and `rollout.update` (rl.epochs x
rl.num_minibatches updates). A train line every train.log_every_steps iterations, an eval line every
eval.every_steps (and one console line each); checkpoints fall at iteration ends and record the
prompt position, the seed and the metrics not yet written, so kill -9 anywhere and resume equals an
uninterrupted run bit for bit on CPU (`tests/test_rollout.py`). The post-run steps that read only the
metrics (the diagnostics) run at the end.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from lmobjective import faults, files, sharding
from lmobjective.config import ConfigError
from lmobjective.run import checkpoint as ckpt_lib
from lmobjective.run import lock, metrics_log, save_watch, scorer
from lmobjective.run import loop_checks
from lmobjective.run.preemption import EXIT_CODES, Preempted, preemption_signals
from lmobjective.run.rollout import RL, build, collect, evaluate, update



@dataclasses.dataclass
class Window:
  """The iterations' rollout metrics since the last train line (a checkpoint carries them)."""
  rollouts: list
  t_last: float = 0.0


UNDEFINED_OK = ("val/var_explained",)  # rollout metrics that are NaN on an iteration where they have no value


def _record(rlx: RL, done: int, finite: list[dict], window: Window, loop: loop_checks.LoopState) -> dict:
  last = finite[-1]
  rec = {"step": done, "updates": done * rlx.updates_per_iteration, "lr": float(last["lr"]),
         "grad_norm": float(last["grad_norm"]), "update_norm": float(last["update_norm"]),
         "param_norm": float(last["param_norm"])}
  if "signal_sequences" in last:  # responses with a non-zero advantage in the update grad_norm belongs to
    rec["signal_sequences"] = int(last["signal_sequences"])
  rec.update(rlx.objective.train_record(finite))
  for key in window.rollouts[0]:
    values = [m[key] for m in window.rollouts if key in m]
    if key in UNDEFINED_OK:  # NaN where it is undefined (returns that do not vary): the mean of the rest
      values = [v for v in values if np.isfinite(v)] or [float("nan")]
    rec[key] = float(np.max(values) if key.endswith("_max") else np.mean(values))
  loop.tokens_seen += int(sum(m["num_tokens"] for m in finite))
  rec["tokens_seen"] = loop.tokens_seen
  rec["iterations_per_sec"] = len(window.rollouts) / max(time.time() - window.t_last, 1e-9)
  return rec


def _save(rlx: RL, watch, state, done: int, loop: loop_checks.LoopState, window: Window) -> None:
  loop_checks.fetch_pending(rlx, loop, int(state.step))  # never saves a state reached through a diverged update
  epoch, offset = rlx.order.position(done)
  meta = {"iteration": done, "updates_per_iteration": rlx.updates_per_iteration,
          "prompt_position": {"epoch": epoch, "offset": offset}, "seed": rlx.config.seed,
          "tokens_seen": loop.tokens_seen, "skipped": loop.skipped, "init_param_norm": loop.init_param_norm,
          "pending": ckpt_lib.encode_metrics(loop.pending), "window": window.rollouts,
          "tokenizer": {"path": "tokenizer", "fingerprint": rlx.tokenizer.fingerprint()},
          "data": rlx.data_fingerprints}
  if rlx.origin is not None:
    meta["origin"] = rlx.origin.record()
  if rlx.reward_model is not None:
    meta["reward_model"] = rlx.reward_model.record()
  watch.save(state, meta, rlx.raw_config)


def run_loop(rlx: RL, state, writer, watch=None, loop: loop_checks.LoopState | None = None, window: Window | None = None,
             stop=None):
  """Iterations from state.step / updates_per_iteration to train.steps (see the module docstring)."""
  cfg, U = rlx.config, rlx.updates_per_iteration
  loop = loop or loop_checks.LoopState(pending=[], tokens_seen=0)
  if loop.init_param_norm is None and int(state.step) == 0:
    loop.init_param_norm = float(jax.jit(optax.tree.norm)(state.params))
  window = window or Window([])
  start = int(state.step) // U
  try:
    if start == 0:
      ev = {"step": 0, **evaluate(rlx, state.params)}
      writer.write({**ev, "param_norm": loop.init_param_norm})
      _print_progress(rlx, ev)
    window.t_last = time.time()
    for i in range(start, cfg.train.steps):
      faults.point("step")
      rollouts = collect(rlx, state.params, i)
      window.rollouts.append(rollouts.metrics)
      state = update(rlx, state, rollouts, i, loop.pending)
      if watch is not None:
        watch.check(wait=True)
      done = i + 1
      if done % cfg.train.log_every_steps == 0 or done == cfg.train.steps:
        finite = loop_checks.fetch_pending(rlx, loop, done * U)
        if finite:
          rec = _record(rlx, done, finite, window, loop)
          writer.write(rec)
          _print_progress(rlx, rec)
        loop.pending, loop.checked, window.rollouts, window.t_last = [], 0, [], time.time()
      if rlx.eval_prompts is not None and (done % cfg.eval.every_steps == 0 or done == cfg.train.steps):
        ev = {"step": done, **evaluate(rlx, state.params, done)}
        writer.write(ev)
        _print_progress(rlx, ev)
        window.t_last = time.time()
      preempted = stop is not None and stop.signum is not None
      every = cfg.checkpoint.every_steps
      if watch is not None and ((every and done % every == 0) or done == cfg.train.steps or preempted):
        writer.flush()
        _save(rlx, watch, state, done, loop, window)
      if preempted:
        if watch is not None:
          watch.check(wait=True)
        raise Preempted(EXIT_CODES[stop.signum])
  except loop_checks.Diverged as e:
    writer.write({"step": e.step // U, "diverged": str(e)})
    raise
  if watch is not None:
    watch.check(wait=True)
  return state


def restore_or_init(rlx: RL, mngr):
  """(state, LoopState or None, Window or None, the iteration resumed from or None)."""
  state_shape = rlx.ms.init_fn.eval_shape(jax.random.key(rlx.config.seed))
  abstract = sharding.abstract_state(state_shape, rlx.ms.state_sharding)
  restored = ckpt_lib.restore_latest(mngr, rlx.workdir, abstract, start_over=rlx.config.checkpoint.start_over)
  if restored is None:
    return rlx.ms.init_fn(jax.random.key(rlx.config.seed)), None, None, None
  state, meta, saved_config = restored
  step_ = int(state.step)
  ckpt_lib.check_config(saved_config, ckpt_lib.config_json(rlx.raw_config),
                        rlx.config.checkpoint.allow_config_change, step_)
  if meta["tokenizer"]["fingerprint"] != rlx.tokenizer.fingerprint():
    raise ConfigError("data.tokenizer", os.path.join(rlx.workdir, "tokenizer"),
                      f"differs from the tokenizer of the checkpoint at update {step_}; use a new workdir")
  loop_checks.check_data(rlx.config, rlx.data_fingerprints, meta.get("data"), step_)
  scorer.check_resumed(rlx.reward_model, meta.get("reward_model"), step_)
  pending = ckpt_lib.decode_metrics(meta["pending"])
  loop = loop_checks.LoopState(pending=pending, tokens_seen=meta["tokens_seen"], skipped=meta["skipped"],
                             checked=len(pending), init_param_norm=meta.get("init_param_norm"))
  return state, loop, Window(list(meta["window"])), meta["iteration"]


def run_owned(config: ml_collections.ConfigDict, cfg, workdir: str, lead: bool, post_run=()) -> dict[str, Any]:
  """`train.run` of an RL objective, inside the workdir lock: build, restore, loop, checkpoints; then the
  post-run steps that read only the metrics (`applies_to_rl`: the diagnostics)."""
  loop_checks.check_resume_config(config, cfg, workdir)
  rlx = build(config, workdir)
  mngr = ckpt_lib.make_manager(workdir, cfg.checkpoint)
  with save_watch.SaveWatch(mngr, workdir) as watch:
    try:
      state, loop, window, resumed = restore_or_init(rlx, mngr)
      if lead:
        files.remove_stale_temporaries(
            workdir, ["config.json", lock.LOCK_FILE, metrics_log.METRICS_FILE, metrics_log.UNREADABLE_FILE])
        loop_checks.write_config(config, workdir, rlx.origin)
        metrics_log.truncate_metrics(workdir, resumed)
        if resumed is not None:
          print(f"resuming from the checkpoint at iteration {resumed} (update {int(state.step)})", flush=True)
      _print_header(rlx, state)
      writer = metrics_log.MetricsWriter(workdir, enabled=lead, purge_step=0 if resumed is None else resumed + 1)
      try:
        with preemption_signals() as stop:
          state = run_loop(rlx, state, writer, watch, loop, window, stop)
      finally:
        writer.close()
    except OSError as e:
      loop_checks.close_manager(mngr)
      raise save_watch.WriteFailed(f"cannot write {e.filename or workdir} ({e.strerror or e}); "
                                   f"{save_watch.last_good(workdir)}") from None
    finally:
      loop_checks.close_manager(mngr)
    watch.check()
  for step_fn in post_run:
    if getattr(step_fn, "applies_to_rl", False):
      step_fn(rlx, state.params, workdir, lead)
  evals = [r for r in metrics_log.read_metrics(workdir) if "val_reward_greedy" in r] if lead else []
  return evals[-1] if evals else {}


def _print_progress(rlx: RL, rec: dict) -> None:
  """One console line per train line or eval: the iteration and its headline metrics."""
  if jax.process_index() != 0 or len(rec) < 2:
    return
  keys = (("reward", "reward"), ("objective/kl", "kl"), ("objective/entropy_full", "entropy"),
          ("frac_reward_zero_std", "no-signal groups"), ("val_reward_greedy", "held-out greedy"),
          ("val_reward_sampled", "sampled"), ("val_kl_full_sampled", "kl"))
  parts = [f"{name} {rec[k]:.4g}" for k, name in keys if k in rec]
  if "iterations_per_sec" in rec:
    parts.append(f"{rec['iterations_per_sec']:.2f} it/s")
  print(f"iteration {rec['step']}/{rlx.config.train.steps} | " + " | ".join(parts), flush=True)


def _print_header(rlx: RL, state) -> None:
  if jax.process_index() != 0:
    return
  c = rlx.config
  print(f"lmobjective RL | objective {c.objective.kind} beta {c.objective.beta} | devices {jax.device_count()} | "
        f"{c.train.batch_size} prompts x {c.rl.num_generations} responses per iteration, "
        f"{rlx.updates_per_iteration} updates each | {len(rlx.prompts)} prompts"
        + (f", {len(rlx.eval_prompts)} held out" if rlx.eval_prompts is not None else ""), flush=True)
  if rlx.origin is not None:
    o = rlx.origin
    print(f"init_from (also the reference): {o.workdir} step {o.step} (params sha256 {o.params_fingerprint})", flush=True)
  if rlx.reward_model is not None:
    r = rlx.reward_model
    print(f"rl.reward_model: {r.workdir} step {r.step} (params sha256 {r.params_fingerprint})", flush=True)
