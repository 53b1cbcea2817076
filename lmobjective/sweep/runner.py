"""Sweep runner: one training run per entry of a sweep spec, each in its own sub-directory.

  python -m lmobjective.sweep --sweep=experiments/mixture_ablation.py:quick --workdir=runs/mix \
      [--parallel=2] [--launcher=local|slurm] [--config.KEY=VALUE ...]

The spec format is in `lmobjective.sweep.spec`. Precedence: spec overrides < run overrides < command-line `--config.*` (applied to every run).

Each run is `python -m lmobjective.train --config=BASE --workdir=DIR/<name> --config.K=V ...`
in a subprocess (output in DIR/<name>/train.log). A run is finished only when DIR/<name>/DONE.json
exists (written after the subprocess exits 0), so re-running the same command skips finished
runs and re-launches the rest: train.py resumes from DIR/<name>/checkpoints when it has them, and
a run without checkpoints starts over (its partial metrics are moved to attempt-<n>/).
Unless the runs set data.tokenizer.* themselves, one tokenizer is trained in DIR/shared/ on the
base config and every run uses it, so losses compare on the same vocabulary.
Afterwards DIR/results.{csv,md} and the sweep plots are written (lmobjective.sweep.results).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

from lmobjective import config as config_lib
from lmobjective import files
from lmobjective.sweep.spec import (FLAG, SweepError, expand, format_value, load_spec, parse_extra,
                                     run_config)

DONE_FILE = "DONE.json"
LOG_FILE = "sweep_log.jsonl"  # one line per launch and per outcome: the launch counter
SPEC_FILE = "sweep.json"
ROOT = config_lib.PROJECT_ROOT


class _Children:
  """The sweep's running training subprocesses. Once `stop` ran (the sweep was interrupted) none starts:
  a launch that was between its "start" line and its Popen when the signal came is not left running."""

  def __init__(self):
    self.lock, self.procs, self.stopped = threading.Lock(), set(), False

  def start(self, cmd: list[str], **popen_kw) -> subprocess.Popen | None:
    with self.lock:
      if self.stopped:
        return None
      proc = subprocess.Popen(cmd, **popen_kw)
      self.procs.add(proc)
      return proc

  def stop(self) -> None:
    with self.lock:
      self.stopped = True
      for proc in self.procs:
        proc.terminate()


_CHILDREN = _Children()  # replaced by each run_all


# ---- the plan ----------------------------------------------------------------------------------


def _resolve_config(path: str, spec_path: str) -> str:
  file, _, arg = path.partition(":")
  for cand in (file, os.path.join(ROOT, file), os.path.join(os.path.dirname(spec_path), file)):
    if os.path.exists(cand):
      return os.path.abspath(cand) + (f":{arg}" if arg else "")
  raise SweepError(f"sweep spec {spec_path}: base config not found: {file}")


def plan(sweep: str, workdir: str, extra: dict[str, str]) -> dict:
  """Everything needed to launch (and later re-launch or verify) the sweep; validated up front."""
  spec = load_spec(sweep)
  base = _resolve_config(spec["config"], sweep.partition(":")[0])
  common = dict(spec.get("overrides", {}))
  runs, per_run = {}, expand(spec)
  for name, ov in per_run.items():
    merged = {**common, **ov, **extra}
    cfg = run_config(base, merged)
    _validate(cfg, name)
    runs[name] = {k: v if isinstance(v, str) else format_value(v) for k, v in merged.items()}
  touches_tok = any(k.startswith("data.tokenizer.") for ov in per_run.values() for k in ov)
  base_cfg = run_config(base, {**common, **extra})
  share_tok = not touches_tok and base_cfg.data.tokenizer.kind != "byte"
  return {"sweep": sweep, "workdir": os.path.abspath(workdir), "config": base, "extra": extra,
          "common": {k: format_value(v) for k, v in common.items()}, "runs": runs,
          "shared_tokenizer": share_tok, "description": spec.get("description", "")}


def _validate(cfg, name: str) -> None:
  from lmobjective.validation import validate
  try:
    validate(cfg)
  except config_lib.ConfigError as e:
    raise SweepError(f"run {name}: {e}") from None


def shared_tokenizer(p: dict) -> str:
  """Trains (once) the base config's tokenizer in DIR/shared/tokenizer and returns its path."""
  from lmobjective.data import tokenizer_build
  shared = os.path.join(p["workdir"], "shared")
  cfg = run_config(p["config"], {**p["common"], **p["extra"]})
  tokenizer_build.build_tokenizer(cfg.data, shared)
  return os.path.join(shared, "tokenizer")


def command(p: dict, name: str) -> list[str]:
  overrides = dict(p["runs"][name])
  if p["shared_tokenizer"]:
    overrides["data.tokenizer.path"] = os.path.join(p["workdir"], "shared", "tokenizer")
  return [sys.executable, "-m", "lmobjective.train", f"--config={p['config']}",
          f"--workdir={os.path.join(p['workdir'], name)}",
          *(f"{FLAG}{k}={v}" for k, v in overrides.items())]


# ---- running -----------------------------------------------------------------------------------


def is_done(run_dir: str) -> bool:
  return os.path.exists(os.path.join(run_dir, DONE_FILE))


def _log(workdir: str, **event) -> None:
  with open(os.path.join(workdir, LOG_FILE), "a") as f:
    f.write(json.dumps({"time": time.time(), **event}) + "\n")


def read_log(workdir: str) -> list[dict]:
  path = os.path.join(workdir, LOG_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _prepare_relaunch(run_dir: str) -> None:
  """A run with no checkpoint starts over: move its partial outputs aside so metrics stay clean."""
  ckpt = os.path.join(run_dir, "checkpoints")
  if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")) or (os.path.isdir(ckpt) and os.listdir(ckpt)):
    return
  n = 1
  while os.path.exists(os.path.join(run_dir, f"attempt-{n}")):
    n += 1
  dest = os.path.join(run_dir, f"attempt-{n}")
  os.makedirs(dest)
  for f in ("metrics.jsonl", "tensorboard", "diagnostics.json", "val_loss_by_position.json"):
    if os.path.exists(os.path.join(run_dir, f)):
      shutil.move(os.path.join(run_dir, f), dest)


def launch(p: dict, name: str) -> bool:
  """Runs one training subprocess; writes DONE.json only if it exits 0."""
  run_dir = os.path.join(p["workdir"], name)
  os.makedirs(run_dir, exist_ok=True)
  _prepare_relaunch(run_dir)
  cmd = command(p, name)
  _log(p["workdir"], event="start", run=name)
  print(f"[sweep] start {name}", flush=True)
  t0 = time.time()
  with open(os.path.join(run_dir, "train.log"), "a") as log:
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    proc = _CHILDREN.start(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    rc = proc.wait() if proc is not None else -signal.SIGTERM  # None: the sweep was stopped first
  wall = time.time() - t0
  _log(p["workdir"], event="done" if rc == 0 else "failed", run=name, rc=rc, wall_s=wall)
  if rc != 0:
    print(f"[sweep] FAILED {name} (exit {rc}); see {run_dir}/train.log:\n" + _tail(run_dir), flush=True)
    return False
  files.write_json(os.path.join(run_dir, DONE_FILE),
                   {"run": name, "wall_s": wall, "command": cmd, "finished": time.time()}, indent=1)
  print(f"[sweep] done  {name} in {wall:.0f}s", flush=True)
  return True


def _tail(run_dir: str, n: int = 5) -> str:
  with open(os.path.join(run_dir, "train.log")) as f:
    return "".join(f.readlines()[-n:])


def run_all(p: dict, names: list[str], parallel: int = 1) -> list[str]:
  """Launches the unfinished runs among `names`; returns the names that failed."""
  todo = [n for n in names if not is_done(os.path.join(p["workdir"], n))]
  skipped = len(names) - len(todo)
  print(f"[sweep] {len(names)} runs: {skipped} already finished, {len(todo)} to run"
        f"{f', {parallel} at a time' if parallel > 1 else ''}", flush=True)
  if todo and p["shared_tokenizer"]:
    shared_tokenizer(p)
  global _CHILDREN
  _CHILDREN = _Children()
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
    try:
      ok = list(pool.map(lambda n: launch(p, n), todo))
    except BaseException:  # Ctrl-C or SIGTERM: stop the children (they checkpoint and exit), then leave
      _CHILDREN.stop()
      raise
  return [n for n, good in zip(todo, ok) if not good]


def save_plan(p: dict) -> None:
  os.makedirs(p["workdir"], exist_ok=True)
  path = os.path.join(p["workdir"], SPEC_FILE)
  files.write_json(path, p, indent=1)


def load_plan(workdir: str) -> dict:
  with open(os.path.join(workdir, SPEC_FILE)) as f:
    return json.load(f)


# ---- SLURM -------------------------------------------------------------------------------------


def slurm_script(p: dict, argv_tail: list[str], header: list[str]) -> str:
  """An array job: task i runs `python -m lmobjective.sweep ... --only=<run i>` (same command line)."""
  names = list(p["runs"])
  sweep_cmd = [sys.executable, "-m", "lmobjective.sweep", f"--sweep={os.path.abspath(p['sweep'].partition(':')[0])}"
               + (f":{p['sweep'].partition(':')[2]}" if ":" in p["sweep"] else ""),
               f"--workdir={p['workdir']}", *argv_tail]
  lines = ["#!/bin/bash", f"#SBATCH --job-name={os.path.basename(p['workdir'])}",
           f"#SBATCH --array=0-{len(names) - 1}",
           f"#SBATCH --output={p['workdir']}/slurm-%A_%a.out", *(f"#SBATCH {h}" for h in header),
           "set -euo pipefail", f"cd {shlex.quote(ROOT)}",
           "RUNS=(" + " ".join(shlex.quote(n) for n in names) + ")",
           ': "${SLURM_ARRAY_TASK_ID:?set SLURM_ARRAY_TASK_ID to a run index 0..' + str(len(names) - 1) + '}"',
           "exec " + shlex.join(sweep_cmd) + ' --only="${RUNS[$SLURM_ARRAY_TASK_ID]}"', ""]
  return "\n".join(lines)


# ---- CLI ---------------------------------------------------------------------------------------


def main(argv: list[str], extra_argv: list[str]) -> int:
  from absl import flags
  F = flags.FLAGS
  if len(argv) > 1:
    raise SweepError(f"unexpected arguments: {argv[1:]}")
  if not F.sweep or not F.workdir:
    raise SweepError("--sweep and --workdir are required")
  p = plan(F.sweep, F.workdir, parse_extra(extra_argv))
  names = list(p["runs"])
  if F.only:
    unknown = [n for n in F.only if n not in p["runs"]]
    if unknown:
      raise SweepError(f"--only: no run named {unknown[0]!r} (runs: {', '.join(names)})")
    names = list(F.only)
  if F.dry_run:
    for n in names:
      print(shlex.join(command(p, n)))
    return 0
  save_plan(p)
  if F.launcher == "slurm":
    path = os.path.join(p["workdir"], "sweep.sbatch")
    with open(path, "w") as f:
      f.write(slurm_script(p, extra_argv, F.slurm_header))
    if p["shared_tokenizer"]:
      shared_tokenizer(p)  # once, before the tasks start
    print(f"wrote {path} ({len(p['runs'])} array tasks); submit with: sbatch {path}")
    return 0
  failed = [] if F.results_only else run_all(p, names, F.parallel)
  from lmobjective.sweep import results
  results.write_all(p, verbose=not F.only)
  if failed:
    print(f"[sweep] {len(failed)} run(s) failed: {', '.join(failed)}; re-run the same command to retry")
  return 1 if failed else 0


def _sigterm(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")


def cli() -> None:
  from absl import app, flags
  flags.DEFINE_string("sweep", None, "Sweep spec: experiments/<name>.py[:arg].")
  flags.DEFINE_string("workdir", None, "Directory of the sweep; each run gets a sub-directory.")
  flags.DEFINE_integer("parallel", 1, "Runs at a time (local launcher).")
  flags.DEFINE_enum("launcher", "local", ["local", "slurm"], "local: run here; slurm: write an sbatch array script.")
  flags.DEFINE_list("only", [], "Run only these run names (the SLURM tasks use this).")
  flags.DEFINE_list("slurm_header", [], "Extra #SBATCH options, e.g. --time=2:00:00,--gres=gpu:1.")
  flags.DEFINE_bool("results_only", False, "Only rebuild results.{csv,md} and plots from finished runs.")
  flags.DEFINE_bool("dry_run", False, "Print each run's command and exit.")
  extra = [a for a in sys.argv[1:] if a.startswith(FLAG)]

  def parse(argv):
    from lmobjective.commands import parse_flags
    return parse_flags([a for a in argv if not a.startswith(FLAG)])

  def run_main(argv):
    signal.signal(signal.SIGTERM, _sigterm)
    try:
      sys.exit(main(argv, extra))
    except (SweepError, config_lib.ConfigError) as e:
      sys.exit(f"error: {e}")

  app.run(run_main, flags_parser=parse)


if __name__ == "__main__":
  cli()
