"""The training loop: `run(config, workdir)`, the library entry point (importable, no globals).

`experiment.build` makes the data, model, mesh and jitted steps; here are the loop (`run_loop`,
`restore_or_init`), its logs and checkpoints. The command line (`python -m lmobjective.train`)
is `lmobjective/train.py`, which adds the post-run analysis steps.

The same command with the same --workdir resumes from the newest good checkpoint, bit for bit
(`checkpoint.py`); metrics.jsonl is cut back to the restored step and the rest is written again.
Exit status: 0 done; 143 after SIGTERM and 130 after SIGINT, each once the current step finished
and a checkpoint was saved (`preemption.py`); 1 with one `error:` line for a bad or changed config
or a NaN/Inf loss (train.nan_policy='stop'; that state is never saved).

Counts in metric names. A *token* is a scored target (loss_mask set and target >= 0):
`tokens_seen` (cumulative), `tokens/<source>` and `share/<source>`, and the denominators of
`train_loss`, `train_accuracy` and `z_loss`, which are per-token means over the steps since the
previous train line. A *position* is one of the batch_size x context_length input slots, scored
or not: `positions_per_sec` and `mfu` count those, since every position costs FLOPs. With concat
packing every position is scored and the two agree; padding or masked prompts make tokens fewer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np

from lmobjective import config as config_lib
from lmobjective import files, sharding
from lmobjective.model import count_params
from lmobjective.run import checkpoint as ckpt_lib
from lmobjective.run import distributed, lock, metrics_log
from lmobjective.run.experiment import Experiment, build, device_batch, evaluate
from lmobjective.run.preemption import EXIT_CODES, Preempted, preemption_signals
from lmobjective.validation import validate


class NonFiniteLoss(RuntimeError):
  """A NaN/Inf loss or gradient with train.nan_policy='stop'. That state is never saved."""


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


@dataclasses.dataclass
class LoopState:
  """Host bookkeeping a checkpoint carries, so a resumed run writes exactly the lines it would have."""
  pending: list  # train metrics of the steps since the last log line
  tokens_seen: int
  skipped: int = 0
  checked: int = 0  # leading entries of `pending` already checked for NaN (and counted if skipped)


def _fetch_pending(exp: Experiment, loop: LoopState, done: int) -> list[dict]:
  """Host copies of the pending metrics, finite ones only; stops on a non-finite step if so configured."""
  loop.pending = jax.device_get(loop.pending)
  first = done - len(loop.pending) + 1
  bad = [first + i for i, m in enumerate(loop.pending) if i >= loop.checked and not bool(m["finite"])]
  loop.checked = len(loop.pending)
  if bad and exp.config.train.nan_policy == "stop":
    raise NonFiniteLoss(f"non-finite loss or gradient at step {bad[0]} (train.nan_policy='stop'); "
                        "that state was not saved; resume restarts from the last checkpoint")
  for b in bad:
    ckpt_lib.warn(f"non-finite loss or gradient at step {b}: update skipped (train.nan_policy='skip')")
  loop.skipped += len(bad)
  return [m for m in loop.pending if bool(m["finite"])]


def _log_train(exp, done, loop: LoopState, writer, accounting, progress, t_last: float) -> None:
  finite = _fetch_pending(exp, loop, done)
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


def _save(exp, mngr, state, batches, accounting, loop: LoopState, val_loss) -> None:
  _fetch_pending(exp, loop, int(state.step))  # never saves a state reached through a NaN step
  meta = {"data_iter": batches.get_state(), "accounting": accounting.counts.tolist(),
          "tokens_seen": loop.tokens_seen, "skipped": loop.skipped,
          "pending": ckpt_lib.encode_metrics(loop.pending),
          "tokenizer": {"path": "tokenizer", "fingerprint": exp.tokenizer.fingerprint()}}
  ckpt_lib.save(mngr, state, meta, exp.raw_config, val_loss)


def run_loop(exp: Experiment, state, batches: Iterator[dict], writer: metrics_log.MetricsWriter,
             accounting: TokenAccounting, mngr=None, loop: LoopState | None = None, stop=None) -> Any:
  """Steps from state.step to train.steps; checkpoints into `mngr` (if given); `stop.signum` set = preempt."""
  cfg = exp.config
  total = cfg.train.steps
  progress = metrics_log.Progress(total)
  start = int(state.step)
  loop = loop or LoopState(pending=[], tokens_seen=int(accounting.counts.sum()))
  if start == 0 and exp.eval_sets:
    writer.write({"step": 0, **evaluate(exp, state.params)})
  t_last = time.time()  # after the step-0 eval: eval time is not training throughput
  for s in range(start, total):
    host_batch = next(batches)
    accounting.add(host_batch)
    state, metrics = exp.train_fn(state, device_batch(exp, host_batch))
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
    if mngr is not None and ((every and done % every == 0) or done == total or preempted):
      writer.flush()  # a kill -9 after this save must not lose the events up to its step
      _save(exp, mngr, state, batches, accounting, loop, val_loss)
    if preempted:
      raise Preempted(EXIT_CODES[stop.signum])
  return state


def restore_or_init(exp: Experiment, mngr, batches) -> tuple[Any, LoopState | None, TokenAccounting, int | None]:
  """The newest good checkpoint (state, loop bookkeeping, accounting; data iterator set in place), else a fresh state."""
  accounting = TokenAccounting(exp.pipeline.source_names)
  state_shape = exp.init_fn.eval_shape(jax.random.key(exp.config.seed))
  abstract = sharding.abstract_state(state_shape, exp.state_sharding)
  restored = ckpt_lib.restore_latest(mngr, exp.workdir, abstract)
  if restored is None:
    return exp.init_fn(jax.random.key(exp.config.seed)), None, accounting, None
  state, meta, saved_config = restored
  step_ = int(state.step)
  ckpt_lib.check_config(saved_config, ckpt_lib.config_json(exp.raw_config),
                        exp.config.checkpoint.allow_config_change, step_)
  if meta["tokenizer"]["fingerprint"] != exp.tokenizer.fingerprint():
    raise config_lib.ConfigError("data.tokenizer", os.path.join(exp.workdir, "tokenizer"),
                                 f"differs from the tokenizer of the checkpoint at step {step_}; use a new workdir")
  batches.set_state(meta["data_iter"])
  accounting.counts = np.asarray(meta["accounting"], np.int64)
  pending = [_with_sums(m) for m in ckpt_lib.decode_metrics(meta["pending"])]
  loop = LoopState(pending=pending, tokens_seen=meta["tokens_seen"], skipped=meta["skipped"], checked=len(pending))
  return state, loop, accounting, step_


def _with_sums(metrics: dict) -> dict:
  """Step metrics a checkpoint saved before steps reported `correct_sum` and `z_sum` (it has the
  step's means `accuracy` and `z_loss`): the sums, so a resumed run can weight its window."""
  if "correct_sum" in metrics:
    return metrics
  out = dict(metrics)
  n = np.float32(out["num_tokens"])
  out["correct_sum"], out["z_sum"] = out.pop("accuracy") * n, out.pop("z_loss") * n
  return out


def _train_record(exp, done, metrics_list, seconds, tokens_before) -> dict[str, Any]:
  """The train line for the steps since the last one: losses and accuracy per scored token of the
  whole window; lr and the norms are the last step's."""
  n = np.array([m["num_tokens"] for m in metrics_list], np.float64)
  per_token = lambda key: float(np.sum([np.float64(m[key]) for m in metrics_list]) / max(n.sum(), 1))
  loss = float((np.array([m["loss"] for m in metrics_list]) * n).sum() / max(n.sum(), 1))
  last = metrics_list[-1]
  positions = len(metrics_list) * exp.config.train.batch_size * exp.config.data.context_length
  rec = {"step": done, "train_loss": loss, "lr": float(last["lr"]), "grad_norm": float(last["grad_norm"]),
         "update_norm": float(last["update_norm"]), "param_norm": float(last["param_norm"]),
         "train_accuracy": per_token("correct_sum"), "tokens_seen": tokens_before + int(n.sum()),
         "positions_per_sec": positions / max(seconds, 1e-9)}
  if exp.config.objective.z_loss > 0:
    rec["z_loss"] = per_token("z_sum")
  if exp.peak_flops:
    rec["mfu"] = rec["positions_per_sec"] * exp.flops_per_token / (exp.peak_flops * jax.device_count())
  return rec


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  path = os.path.join(workdir, "config.json")
  files.write_json(path, config.to_dict(), indent=2, sort_keys=True, default=str)


PostRunStep = Callable[[Experiment, Any, str, bool], None]


def run(config: ml_collections.ConfigDict, workdir: str, post_run: Sequence[PostRunStep] = ()) -> dict[str, Any]:
  """Trains per `config`, writing outputs to `workdir`. Returns the last eval record (lead process).

  `post_run`: steps `fn(exp, params, workdir, is_lead)` run on every process after the last
  checkpoint (the CLI passes `analysis.post_run.STEPS`: loss by position, plots, loss table, diagnostics),
  so training depends on no analysis code.
  """
  validate(config)  # the one validator, before anything is built or written
  files.check_workdir(workdir)
  cfg = config_lib.typed(config)
  distributed.setup(cfg)  # XLA flags and jax.distributed.initialize: before any backend use
  lead = distributed.is_lead()
  owner = lock.WorkdirLock(workdir) if lead else contextlib.nullcontext()
  with owner:  # one run per workdir: a second one refuses in one line, before it writes anything
    return _run_owned(config, cfg, workdir, lead, post_run)


def _run_owned(config, cfg, workdir: str, lead: bool, post_run) -> dict[str, Any]:
  mngr = ckpt_lib.make_manager(workdir, cfg.checkpoint)
  try:
    exp, state = _start_and_loop(config, cfg, workdir, lead, mngr)
  finally:  # on any error too; an asynchronous save must land before the process exits
    ckpt_lib.close(mngr)
  for step_fn in post_run:  # e.g. post_run.STEPS: loss by position, plots, diagnostics
    step_fn(exp, state.params, workdir, lead)
  evals = [r for r in metrics_log.read_metrics(workdir) if "val_loss" in r] if lead else []
  return evals[-1] if evals else {}


def _start_and_loop(config, cfg, workdir: str, lead: bool, mngr):
  latest = ckpt_lib.latest_config(mngr)  # refuse a changed config before touching the run's files
  if latest is not None:
    ckpt_lib.check_config(latest[1], ckpt_lib.config_json(config), cfg.checkpoint.allow_config_change,
                          latest[0])
  if lead:
    os.makedirs(workdir, exist_ok=True)
    write_config(config, workdir)
  exp = build(config, workdir)
  batches = exp.pipeline.train_iterator()
  state, loop, accounting, resumed_step = restore_or_init(exp, mngr, batches)
  if lead:
    ckpt_lib.truncate_metrics(workdir, resumed_step)  # lines past the checkpoint are written again
    if resumed_step is not None:
      print(f"resuming from the checkpoint at step {resumed_step}", flush=True)
  _print_header(exp, state)
  writer = metrics_log.MetricsWriter(workdir, enabled=lead,
                                     purge_step=0 if resumed_step is None else resumed_step + 1)
  try:
    with preemption_signals() as stop:
      state = run_loop(exp, state, batches, writer, accounting, mngr, loop, stop)
  finally:
    writer.close()
  return exp, state


def _print_header(exp: Experiment, state) -> None:
  if jax.process_index() != 0:
    return
  c = exp.config
  print(f"lmobjective | devices {jax.device_count()} x {jax.devices()[0].device_kind} | mesh "
        f"{dict(exp.mesh.shape)} | params {count_params(state.params):,} | vocab {exp.model_cfg.vocab_size}"
        f" (ln V = {np.log(exp.model_cfg.vocab_size):.3f}) | {c.train.batch_size}x{c.data.context_length}"
        f" positions/step | {exp.flops_per_token / 1e6:.1f} MFLOP/position")
  print("sources (token share): " + ", ".join(
      f"{n} {w:.2f}" for n, w in zip(exp.pipeline.source_names, exp.pipeline.weights)))
  for at, w_S in exp.pipeline.stages:
    print(f"  from step {at}: " + ", ".join(f"{n} {w:.2f}" for n, w in zip(exp.pipeline.source_names, w_S)))
  for name, st in exp.pipeline.stats(step=0)["sources"].items():
    if "entropy_rate_nats" in st:
      print(f"  {name}: exact entropy rate {st['entropy_rate_nats']:.4f} nats/symbol = "
            f"{st['entropy_rate_bits_per_byte']:.4f} bits/byte (the floor for val_bits_per_byte/{name})")
  sys.stdout.flush()
