"""An experiment's stages as subprocesses, in dependency order, `jobs` at a time, sharing one XLA cache.

    stages = [Stage("sft", argv, finished=False), Stage("dpo", argv2, after=("sft",)), ...]
    seconds = schedule.run(stages, workdir, jobs=2)

A stage starts when every stage it comes `after` has finished, the first ready one in list order
taking a free slot. With `jobs` 1 a stage's output goes to the terminal as it runs; with more, each
writes WORKDIR/logs/NAME.log: the log of the stage started first is echoed as it grows, another's
whole when it ends, so the output reads stage by stage. A stage whose argv is a callable builds it just before it starts
(inputs the driver writes from an earlier stage's output). A failed stage stops the others (SIGTERM: they checkpoint and
exit) and ends the driver with one line naming it and its log. SIGTERM or Ctrl-C to the driver does the same to
every running stage and exits 143 / 130 once they have saved (`preemption.py`); the same command resumes them.
The signal is acted on between the driver's steps, so a stage it lands beside is never left running unwatched.

On 2 CPU cores two stages at once gain where a stage leaves a core idle (tracing, compiling, decoding
token by token, writing checkpoints): two 10-iteration PPO runs took 173 s together against 127 s each
alone; two 40-iteration runs, mostly arithmetic, about as long together as one after the other (measured
on 2026-12-07). On one GPU, run one at a time (`default_jobs`).

Every stage compiles through JAX's persistent cache in WORKDIR/xla_cache (unless
JAX_COMPILATION_CACHE_DIR is set): stages of one kind (the two proxies, the RL runs) compile the
same programs, and a cached executable is the binary XLA would build again, so nothing a stage
computes changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
import time
from typing import Callable, Sequence

from lmobjective.run import preemption

CACHE_DIR = "xla_cache"
LOG_DIR = "logs"


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  argv: Sequence[str] | Callable[[], Sequence[str]]  # after the interpreter: ["-m", "lmobjective.train", ...]
  after: tuple[str, ...] = ()
  finished: bool = False  # reused: not run, counts as done


def trained(run_dir: str, config) -> bool:
  """Whether the training run in `run_dir` saved the final checkpoint `config` asks for (an RL run counts
  its updates: iterations x rl.epochs x rl.num_minibatches)."""
  from lmobjective import objectives
  from lmobjective.run import checkpoint
  rl = issubclass(objectives.OBJECTIVES[config.objective.kind], objectives.policy.PolicyGradient)
  updates = config.train.steps * (config.rl.epochs * config.rl.num_minibatches if rl else 1)
  return os.path.isdir(run_dir) and updates in checkpoint.finalized_steps(run_dir)


def default_jobs() -> int:
  """2 on a CPU machine with 2 or more cores; 1 where a GPU plugin is installed (two processes would
  each claim most of its memory) or on one core."""
  if any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")):
    return 1
  return min(2, os.cpu_count() or 1)


def add_jobs_flag(parser) -> None:
  """The drivers' `--jobs` (argparse): a positive count, refused in one line otherwise; None: `default_jobs`."""
  def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
      raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)
  parser.add_argument("--jobs", type=positive, default=None,
                      help="stages run at once where their inputs allow (default: 2 on a CPU machine, 1 with a GPU)")


def cache_env(workdir: str) -> dict[str, str]:
  """The environment every stage runs in: JAX's persistent compilation cache in WORKDIR/xla_cache."""
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, CACHE_DIR))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return env


def _check(stages: Sequence[Stage]) -> None:
  names = [s.name for s in stages]
  for i, s in enumerate(stages):
    if s.name in names[:i]:
      raise ValueError(f"stage {s.name!r} is listed twice")
    missing = [a for a in s.after if a not in names[:i]]
    if missing:
      raise ValueError(f"stage {s.name!r} comes after {missing}, which are not listed before it")


@dataclasses.dataclass
class _Running:
  name: str
  proc: subprocess.Popen
  log: str | None  # None: its output goes to the terminal
  t0: float
  shown: int = 0  # bytes of the log echoed so far

  def echo(self, final: bool = False) -> None:
    """Prints the log's whole lines not shown yet (all of it when `final`), under a header the first time."""
    if self.log is None:
      return
    with open(self.log, "rb") as f:
      f.seek(self.shown)
      new = f.read()
    if not final:
      new = new[:new.rfind(b"\n") + 1]
    if new:
      if self.shown == 0:
        print(f"== {self.name} (from its log, {self.log}):", flush=True)
      sys.stdout.write(new.decode(errors="replace"))
      sys.stdout.flush()
      self.shown += len(new)


def _start(stage: Stage, workdir: str, jobs: int, env: dict) -> _Running:
  argv = list(stage.argv() if callable(stage.argv) else stage.argv)
  print(f"== {stage.name}: {' '.join(argv)}", flush=True)
  if jobs == 1:
    return _Running(stage.name, subprocess.Popen([sys.executable, *argv], env=env), None, time.time())
  log = os.path.join(workdir, LOG_DIR, f"{stage.name}.log")
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(log, "w") as f:
    proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=f, stderr=subprocess.STDOUT)
  return _Running(stage.name, proc, log, time.time())


def run(stages: Sequence[Stage], workdir: str, jobs: int | None = None) -> dict[str, float]:
  """Runs the unfinished stages, `jobs` at a time (None: `default_jobs`); returns each one's wall seconds.
  Exits with one line if one fails."""
  _check(stages)
  jobs = jobs or default_jobs()
  env = cache_env(workdir)
  done = {s.name for s in stages if s.finished}
  for s in stages:
    if s.finished:
      print(f"== {s.name}: reusing the finished stage", flush=True)
  todo = [s for s in stages if not s.finished]
  running: dict[str, _Running] = {}
  seconds: dict[str, float] = {}
  with preemption.preemption_signals() as stop:
    try:
      _loop(todo, running, done, seconds, workdir, jobs, env, stop)
    finally:
      for r in running.values():  # a failed stage, Ctrl-C or SIGTERM: the others checkpoint and exit
        r.proc.terminate()
      for r in running.values():
        r.proc.wait()
  return seconds


def _loop(todo, running, done, seconds, workdir, jobs, env, stop) -> None:
  while todo or running:
    _stop_if_asked(stop, running)
    for s in [s for s in todo if all(a in done for a in s.after)][:max(jobs - len(running), 0)]:
      todo.remove(s)
      running[s.name] = _start(s, workdir, jobs, env)
    if not running:
      raise RuntimeError(f"stages {[s.name for s in todo]} wait on stages that never ran")
    name = _wait_any(running, stop)
    if name is not None:
      r = running.pop(name)
      _finish(name, r, seconds, done)


def _finish(name: str, r: _Running, seconds: dict, done: set) -> None:
  seconds[name] = time.time() - r.t0
  r.echo(final=True)
  if r.proc.returncode:
    sys.exit(f"error: stage {name} exited with status {r.proc.returncode}" + (f"; its log: {r.log}" if r.log else ""))
  print(f"== {name}: done in {seconds[name]:.0f} s", flush=True)
  done.add(name)


def _stop_if_asked(stop: preemption.StopRequest, running: dict[str, _Running]) -> None:
  if stop.signum is not None:
    print(f"== stopping {', '.join(running) or 'nothing running'}: each saves a checkpoint and exits; "
          "the same command goes on from there", flush=True)
    raise preemption.Preempted(preemption.EXIT_CODES[stop.signum])


def _wait_any(running: dict[str, _Running], stop: preemption.StopRequest) -> str | None:
  """The name of a stage that ended, or None once a signal asked the driver to stop; meanwhile the log of
  the stage started first is echoed as it grows."""
  while stop.signum is None:
    next(iter(running.values())).echo()
    for name, r in running.items():
      if r.proc.poll() is not None:
        return name
    time.sleep(0.2)
  return None
