"""Checkpoints of a run: `WORKDIR/checkpoints/<step>/{state,meta,config}` written by an orbax CheckpointManager.

  state   the TrainState (params, optimizer state, step, PRNG key), sharded arrays, saved asynchronously
  meta    JSON: the data iterator's grain state, the token accounting, the train metrics of steps
          not yet logged, the tokenizer's fingerprint (the tokenizer itself is WORKDIR/tokenizer),
          and an order-independent checksum of every state leaf
  config  JSON: the resolved config the run was started with

Exact resume needs nothing else: data position is a pure function of (seed, step), and the
pending metrics make the next metrics line the one an uninterrupted run writes.

A damaged checkpoint (unreadable files, or values whose checksum disagrees) is moved to
`WORKDIR/checkpoints_damaged/<step>` with a warning naming the step, and the previous one is used.
When none is left, the run refuses to start over at step 0 (and overwrite the history) unless
`checkpoint.start_over=True` says so; the old history is then moved to `WORKDIR/before_start_over/`.

A save that fails (a full disk, a lost mount) stops the run: `save_watch.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging as absl_logging
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from lmobjective import config as config_lib
from lmobjective import faults
from lmobjective.run import async_errors
from lmobjective import objectives
from lmobjective.config import ADDED_KEYS, ADDED_SOURCE_KEYS, REMOVED_KEYS, ConfigError  # noqa: F401 (the schema's history)

CKPT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"
FORMAT = 1
# Keys that may differ on resume with checkpoint.allow_config_change=True: they change how long the
# run goes, what it evaluates and logs, where caches live and the device layout, never the math
# of the steps already taken. (More steps also stretches a schedule tied to train.steps.) A stage's
# train.init_from may name a new path too (`_origin_moved`): the origin's recorded params are checked there.
SAFE_CHANGES = ("train.steps", "optimizer.decay_steps", "train.log_every_steps", "eval.", "checkpoint.",
                "train.max_skipped_fraction", "train.dead_grad_steps", "train.max_param_growth",
                "data.cache_dir", "mesh.", "train.xla_gpu_flags", "model.remat", "model.attention",
                "objective.loss_chunk_size")
# Never compared: the flag itself, and where the cluster's coordinator happens to be this time.
IGNORED = ("checkpoint.allow_config_change", "checkpoint.allow_data_change", "checkpoint.start_over",
           "distributed.") + REMOVED_KEYS  # removed keys older runs carry


@contextlib.contextmanager
def quiet_absl(level=absl_logging.ERROR):
  """Orbax logs through absl at INFO/WARNING (e.g. 'read only' notices); keep them out of notebooks and one-line errors."""
  before = absl_logging.get_verbosity()
  absl_logging.set_verbosity(min(level, before))
  try:
    yield
  finally:
    absl_logging.set_verbosity(before)


def make_manager(workdir: str, ckpt_cfg=None, read_only: bool = False) -> ocp.CheckpointManager:
  """The run's manager, with its item handlers declared (a bare manager cannot restore in a new process)."""
  if ckpt_cfg is None:
    policy = None
  elif ckpt_cfg.keep_best:  # the last `keep`, plus the one with the lowest val_loss
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=ckpt_cfg.keep),
        policies.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                       keep_checkpoints_without_metrics=False)])
  else:
    policy = policies.LatestN(n=ckpt_cfg.keep)
  with quiet_absl():  # read_only=True warns that it sets save_interval_steps=0
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=bool(ckpt_cfg.async_save) if ckpt_cfg is not None else False)
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CKPT_DIR)), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": _meta_handler(),
                       "config": ocp.JsonCheckpointHandler()})


def _meta_handler() -> ocp.JsonCheckpointHandler:
  """The meta item's handler: orbax's JSON handler with the `save.meta` fault point in its
  asynchronous write, where a real full disk or kill -9 strikes during a save. (Patched on the
  instance: orbax finds a handler's args by its exact class, so a subclass would not be found.)"""
  handler = ocp.JsonCheckpointHandler()
  write = handler._save_fn

  async def save_fn(x, directory):
    faults.point("save.meta", str(directory))
    return await write(x, directory)

  handler._save_fn = save_fn
  return handler


def close(mngr: ocp.CheckpointManager) -> None:
  """Waits for pending saves and closes `mngr`, after its start-up cleanup of temporary directories
  (a background thread that `close()` leaves running: a run that fails at once would print that
  thread's traceback at exit, under its one error line)."""
  getattr(mngr, "_maybe_await_cleanup_tmp_directory", lambda: None)()  # private in orbax 0.12
  mngr.wait_until_finished()
  mngr.close()


# ---- checksums --------------------------------------------------------------------------------


def _leaf_sum(x: jax.Array) -> jax.Array:
  """Sum of the raw bits as uint32, wrapping: exact and independent of sharding and reduction order."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  size = jnp.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif size == 4 or size == 8:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    bits = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)
  return bits.sum(dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_leaf_sum, tree))


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def checksums(state) -> dict[str, int]:
  """{'params/block_0/attn/query/kernel': uint32 bit-sum, ...} for every leaf."""
  sums = jax.device_get(_checksums_jit(state))
  return {_path(p): int(v) for p, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


# ---- config -------------------------------------------------------------------------------------


def config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def with_added_keys(saved: dict) -> dict:
  """A checkpoint's config as today's schema reads it (`config.with_added_keys`: the keys added since,
  at the values it ran with), the `objective.*` keys its objective does not read at their neutral
  values (`objectives.neutralised`), so `restore` validates and types it like a new one."""
  return objectives.neutralised(config_lib.with_added_keys(saved))


def config_changes(saved: dict, current: dict) -> list[str]:
  """The keys whose values differ (a key older runs lack counts at the value they ran with); an
  `objective.*` key that today's objective does not read is not compared: it changes no number."""
  a, b = _flatten(config_lib.with_added_keys(saved)), _flatten(current)
  unread = {f"objective.{k}" for k in objectives.unread_keys(b.get("objective.kind"))}
  return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>")
                and not k.startswith(IGNORED) and k not in unread)


def _mixture_changes_from(saved: dict, current: dict) -> int | None:
  """The first step whose batch the two configs' mixture schedules deal differently (None: never)."""
  from lmobjective.data import mixture
  schedules = []
  for cfg in (saved, current):
    names = tuple(cfg["data"]["sources"])
    weights = mixture.normalise({n: cfg["data"]["sources"][n]["weight"] for n in names})
    schedules.append((names, weights, mixture.parse_stages(cfg["data"].get("mixture_stages", ""), names)))
  (names_a, wa, sa), (names_b, wb, sb) = schedules
  return 0 if names_a != names_b else mixture.first_difference(wa, sa, wb, sb)


def check_config(saved: dict, current: dict, allow_change: bool, step: int) -> None:
  """Refuses a resume whose config differs from the checkpoint's, naming the keys, in one line.

  With allow_change, `data.mixture_stages` may change where the schedules agree on every batch
  before the checkpoint (a stage added or moved at or after its step): those batches are dealt
  exactly as before, so the resume stays exact.
  """
  changed = config_changes(saved, current)
  if "data.mixture_stages" in changed:
    first = _mixture_changes_from(saved, current)  # None: the same schedule respelled, or absent (older runs)
    if first is None or (allow_change and first >= step):
      changed.remove("data.mixture_stages")
  if not changed:
    return
  moved = _origin_moved(saved, current)
  safe = lambda k: k.startswith(SAFE_CHANGES) or (k == "train.init_from" and moved is not None)
  unsafe = [k for k in changed if not safe(k)] if allow_change else changed
  if unsafe:
    a, b = _flatten(saved), _flatten(current)
    diffs = ", ".join(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in unsafe)
    if allow_change:
      hint = "these keys cannot change within a run; use a new workdir"
    elif moved is not None and "train.init_from" in unsafe and all(map(safe, unsafe)):
      hint = ("if the origin moved, move it back, or rerun with "
              "--config.checkpoint.allow_config_change=True (the stage's recorded step and params are then "
              "checked at the new path); else use a new workdir")
    else:
      hint = ("use a new workdir, or --config.checkpoint.allow_config_change to accept changes to "
              "train.steps, eval.*, checkpoint.*, logging, cache dir, mesh, remat, attention kernel and "
              "mixture stages from the checkpoint's step on")
    raise ConfigError("checkpoint", f"step {step}", f"the config differs from the checkpoint's: {diffs}; {hint}")


def _origin_moved(saved: dict, current: dict) -> tuple[str, str] | None:
  """(old, new) `train.init_from` of a stage now naming its origin by another path, else None. Safe with
  allow_config_change: `stage.request` reloads the recorded step there and `stage.load` checks its params."""
  old, new = (c.get("train", {}).get("init_from") for c in (saved, current))
  return (old, new) if old and new and old != new else None


# ---- save / restore ---------------------------------------------------------------------------


def finalized_steps(workdir: str) -> list[int]:
  """Steps whose checkpoint directory is complete (orbax renames a save into place when done)."""
  ckpt_dir = os.path.join(workdir, CKPT_DIR)
  names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)))


def save(mngr: ocp.CheckpointManager, state, meta: dict, config: ml_collections.ConfigDict,
         val_loss: float | None = None) -> bool:
  """Starts an (asynchronous) save of `state` at its step; the arrays are copied before returning."""
  step = int(state.step)
  if step in mngr.all_steps():
    return False
  meta = {**meta, "format": FORMAT, "step": step, "checksums": checksums(state)}
  metrics = {"val_loss": float(val_loss)} if val_loss is not None and np.isfinite(val_loss) else None
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
      config=ocp.args.JsonSave(config_json(config))), metrics=metrics, force=True)


def _quarantine(workdir: str, step: int) -> None:
  if jax.process_index() != 0:
    return
  src = os.path.join(workdir, CKPT_DIR, str(step))
  dst = os.path.join(workdir, DAMAGED_DIR, str(step))
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  if os.path.exists(dst):
    shutil.rmtree(dst)
  if os.path.exists(src):
    shutil.move(src, dst)


def _verify(state, meta: dict) -> None:
  got = checksums(state)
  bad = [k for k, v in meta["checksums"].items() if got.get(k) != v]
  if bad or set(got) != set(meta["checksums"]):
    raise ValueError(f"checksum mismatch in {', '.join(bad[:3]) or 'the tree structure'}")


def warn(msg: str) -> None:
  print(f"warning: {msg}", file=sys.stderr, flush=True)


def restore_latest(mngr: ocp.CheckpointManager, workdir: str, abstract_state, start_over: bool = False):
  """(state, meta, config_dict) of the newest readable checkpoint, else None (a fresh start).

  `abstract_state` carries the target shardings, so a checkpoint written on another device count
  or mesh restores onto this one. Damaged checkpoints are moved aside with a warning. When every
  checkpoint this workdir had is damaged, refuses to start again at step 0 unless `start_over`.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      r = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore(),
          config=ocp.args.JsonRestore()))
      _verify(r["state"], r["meta"])
      if step != max(mngr.all_steps()):
        mngr.reload()  # forget the moved-aside steps, so they are saved afresh
      return r["state"], r["meta"], r["config"]
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
      cause = e.__cause__ or e  # tensorstore's own status, not orbax's wrapper
      reason = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else type(cause).__name__
      warn(f"checkpoint at step {step} is damaged ({type(cause).__name__}: {reason}); moved to "
           f"{os.path.join(workdir, DAMAGED_DIR, str(step))}; falling back to the previous checkpoint")
      _quarantine(workdir, step)
  mngr.reload()
  damaged = os.path.join(workdir, DAMAGED_DIR)
  if os.path.isdir(damaged) and os.listdir(damaged):
    if not start_over:
      raise ConfigError("checkpoint.start_over", False,
                        f"every checkpoint of this run is damaged (moved to {damaged}); starting again at "
                        "step 0 would overwrite its history: restore a checkpoint there, or pass "
                        "--config.checkpoint.start_over=True to start over (the old history is kept aside)")
    _set_aside_history(workdir)
  return None


def _set_aside_history(workdir: str) -> None:
  """checkpoint.start_over: the damaged checkpoints and metrics move to before_start_over/<time>/."""
  if jax.process_index() != 0:
    return
  from lmobjective.run.metrics_log import METRICS_FILE
  dest = os.path.join(workdir, "before_start_over", time.strftime("%Y%m%d-%H%M%S"))
  os.makedirs(dest, exist_ok=True)
  for name in (DAMAGED_DIR, METRICS_FILE, "tensorboard"):
    if os.path.exists(os.path.join(workdir, name)):
      shutil.move(os.path.join(workdir, name), os.path.join(dest, name))
  warn(f"checkpoint.start_over: starting at step 0; the damaged checkpoints and the old metrics are in {dest}")


def restore_params(workdir: str, step: int | None, abstract_params):
  """Only the parameters of checkpoint `step` (default: newest readable), onto `abstract_params`' shardings."""
  async_errors.quiet()  # a damaged one is reported in one warning line
  with quiet_absl():
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CKPT_DIR)),
                                 options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    mngr.reload()
  steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {os.path.join(workdir, CKPT_DIR)}")
  errors = []
  for s in steps:
    try:
      target = {"params": abstract_params}
      r = mngr.restore(s, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                       partial_restore=True),
          meta=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
      params, meta = r["state"]["params"], r["meta"]
      got = checksums({"params": params})
      if any(meta["checksums"].get(k) != v for k, v in got.items()):
        raise ValueError("checksum mismatch")
      return s, params, meta, r["config"]
    except Exception as e:
      if step is not None:
        raise
      warn(f"checkpoint at step {s} is damaged ({type(e).__name__}); trying the previous one")
      errors.append(s)
  raise FileNotFoundError(f"no readable checkpoint in {os.path.join(workdir, CKPT_DIR)} (damaged: {errors})")


def latest_config(mngr: ocp.CheckpointManager) -> tuple[int, dict] | None:
  """(step, saved config) of the newest checkpoint whose config reads, for an early resume check."""
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return step, mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception:  # damaged: restore_latest reports it
      continue
  return None


def encode_metrics(metrics_list: list[dict]) -> list[dict]:
  """Host metrics -> JSON with their dtypes, so decoding gives the same float32 arithmetic back."""
  return [{k: [str(np.asarray(v).dtype), np.asarray(v).item()] for k, v in m.items()} for m in metrics_list]


def decode_metrics(encoded: list[dict]) -> list[dict]:
  return [{k: np.asarray(v, dtype=d) for k, (d, v) in m.items()} for m in encoded]
