"""What every training loop shares: its host bookkeeping (`LoopState`), the divergence checks on the
metrics of the steps since the last check, and the checks a resumed run passes (config, data).

`run/train.py` (token objectives) and `run/rl_loop.py` (reward maximisation) both use them, so a
diverged or changed run stops with the same one-line errors whichever loop runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import ml_collections

from lmobjective import config as config_lib
from lmobjective import files
from lmobjective.data import fingerprint
from lmobjective.run import checkpoint as ckpt_lib


class Diverged(RuntimeError):
  """The run diverged at `step` (exit status 3); the state that diverged is never saved. The
  message starts with what happened: `non-finite`, `dead model`, `exploded` or `skipped`."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class NonFiniteLoss(Diverged):
  """A NaN/Inf loss or gradient with train.nan_policy='stop'. That state is never saved."""


def retry_hint(objective) -> str:
  """What a diverged run says to do; it names the objective's own settings, which can be the cause."""
  return ("that state was not saved; the same config diverges again from the last checkpoint: change it "
          f"(e.g. a lower optimizer.learning_rate, or the objective's settings: {objective.settings()}) in a new workdir")


@dataclasses.dataclass
class LoopState:
  """Host bookkeeping a checkpoint carries, so a resumed run writes exactly the lines it would have."""
  pending: list  # train metrics of the steps since the last log line
  tokens_seen: int
  skipped: int = 0
  checked: int = 0  # leading entries of `pending` already checked (and counted if skipped)
  dead_streak: int = 0  # consecutive steps with scored tokens and a gradient norm of exactly 0
  init_param_norm: float | None = None  # the reference of train.max_param_growth


def fetch_pending(exp, loop: LoopState, done: int) -> list[dict]:
  """Host copies of the pending metrics, finite ones only; raises `Diverged` on a diverged step."""
  loop.pending = jax.device_get(loop.pending)
  first = done - len(loop.pending) + 1
  cfg, hint = exp.config.train, retry_hint(exp.objective)
  for i in range(loop.checked, len(loop.pending)):
    m, s = loop.pending[i], first + i
    loop.checked = i + 1
    if not bool(m["finite"]):
      if cfg.nan_policy == "stop":
        raise NonFiniteLoss(f"non-finite loss or gradient at step {s} (train.nan_policy='stop'); {hint}", s)
      ckpt_lib.warn(f"non-finite loss or gradient at step {s}: update skipped (train.nan_policy='skip')")
      loop.skipped += 1
      continue
    check_alive(cfg, loop, s, m, hint)
  if loop.skipped > cfg.max_skipped_fraction * cfg.steps:
    raise Diverged(f"skipped {loop.skipped} steps by step {done}, more than train.max_skipped_fraction="
                   f"{cfg.max_skipped_fraction} of train.steps={cfg.steps} (non-finite loss or gradient); {hint}", done)
  return [m for m in loop.pending if bool(m["finite"])]


def check_alive(cfg, loop: LoopState, s: int, m: dict, hint: str) -> None:
  """A finite step can still be dead (zero gradient while tokens are scored) or exploded."""
  # an all-masked batch legitimately has no gradient, and so has an RL update whose advantages are all 0
  if int(m["signal_sequences"] if "signal_sequences" in m else m["num_tokens"]) > 0:
    loop.dead_streak = loop.dead_streak + 1 if float(m["grad_norm"]) == 0.0 else 0
  if loop.dead_streak >= cfg.dead_grad_steps:
    raise Diverged(f"dead model: the gradient norm was exactly 0 at steps {s - loop.dead_streak + 1}..{s} while "
                   f"tokens were scored (train.dead_grad_steps={cfg.dead_grad_steps}); {hint}", s)
  norm = float(m["param_norm"])
  if loop.init_param_norm is None:  # a checkpoint from before the reference was recorded
    loop.init_param_norm = norm
  if norm > cfg.max_param_growth * loop.init_param_norm:
    raise Diverged(f"exploded: the parameter norm {norm:.4g} at step {s} is {norm / loop.init_param_norm:.4g}x its "
                   f"initial {loop.init_param_norm:.4g} (train.max_param_growth={cfg.max_param_growth}); {hint}", s)


def check_data(config, current: dict, saved: dict | None, step_: int) -> None:
  """Refuses to resume on data whose fingerprints (`current`) changed since the checkpoint's (`saved`),
  unless checkpoint.allow_data_change."""
  if saved is None:
    ckpt_lib.warn(f"the checkpoint at step {step_} records no data fingerprints (an older run): the data is not checked")
    return
  changed, touched = fingerprint.changes(saved, current)
  for name, what in touched.items():
    ckpt_lib.warn(f"data.sources.{name}: {what} since the checkpoint at step {step_}")
  if config.checkpoint.allow_data_change:
    for name, what in changed.items():
      ckpt_lib.warn(f"data.sources.{name}: changed since the checkpoint at step {step_} ({what}); "
                    "resuming on it (checkpoint.allow_data_change=True)")
    return
  if changed:
    name, what = next(iter(changed.items()))
    more = f"; also changed: {', '.join(list(changed)[1:])}" if len(changed) > 1 else ""
    source = config.data.sources.get(name)
    raise config_lib.ConfigError(
        f"data.sources.{name}", source.path or source.kind if source else None,
        f"changed since the checkpoint at step {step_} ({what}){more}; resuming would train on other data "
        "and score another validation split: use a new workdir, or --config.checkpoint.allow_data_change=True")


def write_config(config: ml_collections.ConfigDict, workdir: str, origin=None) -> None:
  """The config as given; a stage (train.init_from) adds a top-level "origin": {workdir, step, params_fingerprint}."""
  path = os.path.join(workdir, "config.json")
  record = {**config.to_dict(), **({"origin": origin.record()} if origin is not None else {})}
  files.write_json(path, record, indent=2, sort_keys=True, default=str)


def check_resume_config(config, cfg, workdir: str) -> None:
  if not os.path.isdir(os.path.join(workdir, ckpt_lib.CKPT_DIR)):
    return
  mngr = ckpt_lib.make_manager(workdir, read_only=True)
  try:
    latest = ckpt_lib.latest_config(mngr)
  finally:
    close_manager(mngr)
  if latest is not None:
    ckpt_lib.check_config(latest[1], ckpt_lib.config_json(config), cfg.checkpoint.allow_config_change, latest[0])


def close_manager(mngr) -> None:
  """`checkpoint.close` on every exit path; its errors are the `SaveWatch`'s to report."""
  with contextlib.suppress(Exception):
    ckpt_lib.close(mngr)
