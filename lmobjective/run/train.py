"""The training loop: `run(config, workdir)`, the library entry point (importable, no globals).

`experiment.build` makes the data, model, mesh and jitted steps; here are the loop (`run_loop`,
`restore_or_init`), its logs and checkpoints. The command line (`python -m lmobjective.train`)
is `lmobjective/train.py`, which adds the post-run analysis steps.

The same command with the same --workdir resumes from the newest good checkpoint, bit for bit
(`checkpoint.py`); metrics.jsonl is cut back to the restored step and the rest is written again.
Exit status: 0 done; 143 after SIGTERM and 130 after SIGINT, each once the current step finished
and a checkpoint was saved (`preemption.py`); 1 with one `error:` line for a bad or changed config,
changed data, a failed write (a full disk) or damaged checkpoints; 3 with one `error:` line when
the run diverged (`Diverged`: a non-finite loss with train.nan_policy='stop', a dead or exploded
model, too many skipped steps; that state is never saved).

Nothing is written before the run is validated and built: the workdir lock first (which creates
the directory, and removes it again if the run fails before writing anything else), then the
build, the resume checks (config, tokenizer, data fingerprints, a stage's origin: `stage.py`), and
only then config.json, the tokenizer's directory is kept, and checkpoints/ and metrics are written.

Counts in metric names. A *token* is a scored target (loss_mask set and target >= 0):
`tokens_seen` (cumulative), `tokens/<source>` and `share/<source>`, and the denominators of
`train_loss`, `train_accuracy` and `z_loss`, which are per-token means over the steps since the
previous train line. A *position* is one of the batch_size x context_length input slots, scored
or not: `positions_per_sec` and `mfu` count those, since every position costs FLOPs. With concat
packing every position is scored and the two agree; padding or masked prompts make tokens fewer.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import optax

from lmobjective import config as config_lib
from lmobjective import faults, files, objectives, sharding
from lmobjective.model import count_params
from lmobjective.run import checkpoint as ckpt_lib
from lmobjective.run import distributed, lock, metrics_log, save_watch, stage
from lmobjective.run.loop_checks import (  # noqa: F401 (re-exported: train.Diverged, ...)
    Diverged, LoopState, NonFiniteLoss, check_data, check_resume_config, close_manager, fetch_pending, retry_hint,
    write_config)
from lmobjective.run.experiment import Experiment, build, compile_train_step_ahead, device_batch, evaluate
from lmobjective.run.preemption import EXIT_CODES, Preempted, preemption_signals
from lmobjective.validation import validate


class TokenAccounting:
  """Cumulative scored target tokens fed per source (summed over processes when logged)."""

  def __init__(self, source_names):
    self.names = tuple(source_names)
    self.counts = np.zeros(len(self.names), np.int64)

  def add(self, host_batch: dict) -> None:
    ids = host_batch["source_ids"][host_batch["loss_mask"].astype(bool)]
    self.counts += np.bincount(ids[ids >= 0], minlength=len(self.names))[: len(self.names)]

  def record(self) -> dict[str, Any]:
    counts = self.counts
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
    total = max(int(counts.sum()), 1)
    rec = {f"tokens/{n}": int(c) for n, c in zip(self.names, counts)}
    rec.update({f"share/{n}": float(c) / total for n, c in zip(self.names, counts)})
    return rec


def _log_train(exp, done, loop: LoopState, writer, accounting, progress, t_last: float) -> None:
  finite = fetch_pending(exp, loop, done)
  seconds = time.time() - t_last  # after the fetch: steps run asynchronously until it syncs
  loop.pending, loop.checked = [], 0
  if not finite:
    writer.write({"step": done, "skipped_steps": loop.skipped})
    return
  record = _train_record(exp, done, finite, seconds, loop.tokens_seen)
  loop.tokens_seen = record["tokens_seen"]
  record.update(accounting.record())
  if loop.skipped:
    record["skipped_steps"] = loop.skipped
  writer.write(record)
  progress.update(done, record["train_loss"], record["positions_per_sec"])


def _save(exp, watch: save_watch.SaveWatch, state, batches, accounting, loop: LoopState, val_loss) -> None:
  fetch_pending(exp, loop, int(state.step))  # never saves a state reached through a diverged step
  if loop.dead_streak:  # one zero-gradient step is not yet a dead model, but is never saved
    raise Diverged(f"dead model: the gradient norm was exactly 0 at step {int(state.step)} while tokens were "
                   f"scored, at a checkpoint; {retry_hint(exp.objective)}", int(state.step))
  meta = {"data_iter": batches.get_state(), "accounting": accounting.counts.tolist(),
          "tokens_seen": loop.tokens_seen, "skipped": loop.skipped, "init_param_norm": loop.init_param_norm,
          "pending": ckpt_lib.encode_metrics(loop.pending),
          "tokenizer": {"path": "tokenizer", "fingerprint": exp.tokenizer.fingerprint()},
          "data": exp.pipeline.fingerprints()}
  if exp.origin is not None:  # train.init_from: a resume reloads exactly this reference
    meta["origin"] = exp.origin.record()
  watch.save(state, meta, exp.raw_config, val_loss)


def run_loop(exp: Experiment, state, batches: Iterator[dict], writer: metrics_log.MetricsWriter,
             accounting: TokenAccounting, watch: save_watch.SaveWatch | None = None,
             loop: LoopState | None = None, stop=None) -> Any:
  """Steps from state.step to train.steps; checkpoints through `watch` (if given); `stop.signum` set = preempt.

  A failed asynchronous save stops the run before the next step counts (`SaveFailed`: that step
  is dispatched, and the host waits for the write while it computes); a divergence writes a
  `{"step", "diverged"}` line and raises `Diverged` (that state is not saved).
  """
  loop = loop or LoopState(pending=[], tokens_seen=int(accounting.counts.sum()))
  if loop.init_param_norm is None and int(state.step) == 0:
    loop.init_param_norm = float(jax.jit(optax.tree.norm)(state.params))
  try:
    return _steps(exp, state, batches, writer, accounting, watch, loop, stop)
  except Diverged as e:
    writer.write({"step": e.step, "diverged": str(e)})
    raise


def _steps(exp, state, batches, writer, accounting, watch, loop: LoopState, stop):
  cfg = exp.config
  total = cfg.train.steps
  progress = metrics_log.Progress(total)
  start = int(state.step)
  if start == 0:  # the initial parameter norm: the reference of train.max_param_growth (and diagnose)
    writer.write({"step": 0, **(evaluate(exp, state.params) if exp.eval_sets else {}),
                  "param_norm": loop.init_param_norm})
  t_last = time.time()  # after the step-0 eval: eval time is not training throughput
  for s in range(start, total):
    faults.point("step")
    host_batch = next(batches)
    accounting.add(host_batch)
    state, metrics = exp.train_fn(state, device_batch(exp, host_batch))  # dispatched: computes meanwhile
    if watch is not None:
      watch.check(wait=True)  # the last save's write finished; a failed one stops the run before this step counts
    loop.pending.append(metrics)
    done, val_loss = s + 1, None
    if done % cfg.train.log_every_steps == 0 or done == total:
      _log_train(exp, done, loop, writer, accounting, progress, t_last)
      t_last = time.time()
    if exp.eval_sets and (done % cfg.eval.every_steps == 0 or done == total):
      record = evaluate(exp, state.params)
      writer.write({"step": done, **record})
      val_loss = record.get("val_loss")
      t_last = time.time()  # eval time is not training throughput
    preempted = stop is not None and stop.signum is not None
    every = cfg.checkpoint.every_steps
    if watch is not None and ((every and done % every == 0) or done == total or preempted):
      writer.flush()  # a kill -9 after this save must not lose the events up to its step
      _save(exp, watch, state, batches, accounting, loop, val_loss)
    if preempted:
      if watch is not None:
        watch.check(wait=True)
      raise Preempted(EXIT_CODES[stop.signum])
  if watch is not None:
    watch.check(wait=True)  # the last save landed, or the run says it did not
  return state


def restore_or_init(exp: Experiment, mngr, batches) -> tuple[Any, LoopState | None, TokenAccounting, int | None]:
  """The newest good checkpoint (state, loop bookkeeping, accounting; data iterator set in place), else a fresh state.

  Refuses (one line, nothing written) a checkpoint whose tokenizer or data differ from this run's.
  """
  accounting = TokenAccounting(exp.pipeline.source_names)
  state_shape = exp.init_fn.eval_shape(jax.random.key(exp.config.seed))
  abstract = sharding.abstract_state(state_shape, exp.state_sharding)
  compile_train_step_ahead(exp, abstract)  # XLA compiles the step meanwhile (1-2 s of start-up on 2 cores)
  restored = ckpt_lib.restore_latest(mngr, exp.workdir, abstract, start_over=exp.config.checkpoint.start_over)
  if restored is None:
    return exp.init_fn(jax.random.key(exp.config.seed)), None, accounting, None
  state, meta, saved_config = restored
  step_ = int(state.step)
  ckpt_lib.check_config(saved_config, ckpt_lib.config_json(exp.raw_config),
                        exp.config.checkpoint.allow_config_change, step_)
  if meta["tokenizer"]["fingerprint"] != exp.tokenizer.fingerprint():
    raise config_lib.ConfigError("data.tokenizer", os.path.join(exp.workdir, "tokenizer"),
                                 f"differs from the tokenizer of the checkpoint at step {step_}; use a new workdir")
  check_data(exp.config, exp.pipeline.fingerprints(), meta.get("data"), step_)
  batches.set_state(meta["data_iter"])
  accounting.counts = np.asarray(meta["accounting"], np.int64)
  pending = [exp.objective.restored_metrics(m) for m in ckpt_lib.decode_metrics(meta["pending"])]
  loop = LoopState(pending=pending, tokens_seen=meta["tokens_seen"], skipped=meta["skipped"], checked=len(pending),
                   init_param_norm=meta.get("init_param_norm"))
  return state, loop, accounting, step_


def _train_record(exp, done, metrics_list, seconds, tokens_before) -> dict[str, Any]:
  """The train line for the steps since the last one: the objective's part over the whole window
  (`Objective.train_record`: per scored token, or per pair with TRL's metrics); lr and the norms are
  the last step's."""
  n = np.array([m["num_tokens"] for m in metrics_list], np.float64)
  last = metrics_list[-1]
  rows = len(metrics_list) * exp.config.train.batch_size * exp.pipeline.rows_per_example
  rec = {"step": done, "lr": float(last["lr"]), "grad_norm": float(last["grad_norm"]),
         "update_norm": float(last["update_norm"]), "param_norm": float(last["param_norm"]),
         "tokens_seen": tokens_before + int(n.sum()),
         "positions_per_sec": rows * exp.config.data.context_length / max(seconds, 1e-9)}
  rec.update(exp.objective.train_record(metrics_list))
  if exp.peak_flops:
    rec["mfu"] = rec["positions_per_sec"] * exp.flops_per_token / (exp.peak_flops * jax.device_count())
  return rec


PostRunStep = Callable[[Experiment, Any, str, bool], None]


def run(config: ml_collections.ConfigDict, workdir: str, post_run: Sequence[PostRunStep] = ()) -> dict[str, Any]:
  """Trains per `config`, writing outputs to `workdir`. Returns the last eval record (lead process).

  `post_run`: steps `fn(exp, params, workdir, is_lead)` run on every process after the last
  checkpoint (the CLI passes `analysis.post_run.STEPS`: loss by position, plots, loss table, diagnostics),
  so training depends on no analysis code.
  """
  stage.resolve_hf(config)  # train.init_from=hf:PATH brings model.* and the tokenizer from PATH
  validate(config)  # the one validator, before anything is built or written
  files.check_workdir(workdir)
  cfg = config_lib.typed(config)
  distributed.setup(cfg)  # XLA flags and jax.distributed.initialize: before any backend use
  lead = distributed.is_lead()
  owner = lock.WorkdirLock(workdir) if lead else contextlib.nullcontext()
  with owner:  # one run per workdir: a second one refuses in one line, before it writes anything
    return _run_owned(config, cfg, workdir, lead, post_run)


def _run_owned(config, cfg, workdir: str, lead: bool, post_run) -> dict[str, Any]:
  if objectives.samples_prompts(cfg):  # reward maximisation: its own loop, then the post-run steps for it
    from lmobjective.run import rl_loop
    return rl_loop.run_owned(config, cfg, workdir, lead, post_run)
  check_resume_config(config, cfg, workdir)  # a changed config is refused before anything is built
  exp = build(config, workdir)  # saves the tokenizer last, once every check passed
  mngr = ckpt_lib.make_manager(workdir, cfg.checkpoint)
  with save_watch.SaveWatch(mngr, workdir) as watch:
    try:
      state = _train(exp, config, workdir, lead, mngr, watch)
    except OSError as e:  # a full disk or a lost mount outside the checkpoint writer
      close_manager(mngr)  # a save in flight lands first: it is the last good checkpoint
      raise save_watch.WriteFailed(f"cannot write {e.filename or workdir} ({e.strerror or e}); "
                                 f"{save_watch.last_good(workdir)}") from None
    finally:
      close_manager(mngr)
    watch.check()  # the close waited for the last save
  for step_fn in post_run:  # e.g. post_run.STEPS: loss by position, plots, diagnostics
    step_fn(exp, state.params, workdir, lead)
  evals = [r for r in metrics_log.read_metrics(workdir) if "val_loss" in r] if lead else []
  return evals[-1] if evals else {}


def _train(exp: Experiment, config, workdir: str, lead: bool, mngr, watch):
  batches = exp.pipeline.train_iterator()
  state, loop, accounting, resumed_step = restore_or_init(exp, mngr, batches)
  if lead:  # every check passed: the run's files are written from here on
    files.remove_stale_temporaries(
        workdir, ["config.json", lock.LOCK_FILE, metrics_log.METRICS_FILE, metrics_log.UNREADABLE_FILE])
    write_config(config, workdir, exp.origin)
    metrics_log.truncate_metrics(workdir, resumed_step)  # lines past the checkpoint are written again
    if resumed_step is not None:
      print(f"resuming from the checkpoint at step {resumed_step}", flush=True)
  _print_header(exp, state)
  writer = metrics_log.MetricsWriter(workdir, enabled=lead,
                                     purge_step=0 if resumed_step is None else resumed_step + 1)
  try:
    with preemption_signals() as stop:
      return run_loop(exp, state, batches, writer, accounting, watch, loop, stop)
  finally:
    writer.close()


def _print_header(exp: Experiment, state) -> None:
  if jax.process_index() != 0:
    return
  c = exp.config
  print(f"lmobjective | devices {jax.device_count()} x {jax.devices()[0].device_kind} | mesh "
        f"{dict(exp.mesh.shape)} | params {count_params(state.params):,} | vocab {exp.model_cfg.vocab_size}"
        f" (ln V = {np.log(exp.model_cfg.vocab_size):.3f}) | {c.train.batch_size * exp.pipeline.rows_per_example}x{c.data.context_length}"
        f" positions/step | {exp.flops_per_token / 1e6:.1f} MFLOP/position")
  if exp.origin is not None:
    o = exp.origin
    print(f"init_from: {o.workdir} step {o.step} (params sha256 {o.params_fingerprint})")
  print("sources (token share): " + ", ".join(
      f"{n} {w:.2f}" for n, w in zip(exp.pipeline.source_names, exp.pipeline.weights)))
  for at, w_S in exp.pipeline.stages:
    print(f"  from step {at}: " + ", ".join(f"{n} {w:.2f}" for n, w in zip(exp.pipeline.source_names, w_S)))
  for name, st in exp.pipeline.stats(step=0)["sources"].items():
    if "entropy_rate_nats" in st:
      print(f"  {name}: exact entropy rate {st['entropy_rate_nats']:.4f} nats/symbol = "
            f"{st['entropy_rate_bits_per_byte']:.4f} bits/byte (the floor for val_bits_per_byte/{name})")
  sys.stdout.flush()
