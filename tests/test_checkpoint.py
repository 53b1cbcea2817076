"""Checkpoints: kill -9 / SIGTERM and resume bit for bit, damaged checkpoints, config changes, NaN guard.

Every run is the tiny preset (derived from the default config), 24 steps, a checkpoint every 3.
The kill windows end well before the last step: a tiny step takes milliseconds on a quiet
machine, and a kill that lands after the run finished would test nothing.
"""

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmobjective import config as config_lib
from lmobjective import step
from lmobjective.analysis import inspection
from lmobjective.run import checkpoint as ckpt_lib
from lmobjective.run import metrics_log, train
from _tensorboard import tensorboard_scalars
from _tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"train.steps": 24, "checkpoint.every_steps": 3, "checkpoint.keep": 2, "eval.every_steps": 6}


def tiny(cache_dir, **overrides):
  return tiny_config(cache_dir, **{**OVERRIDES, **overrides})


def cli_args(cache_dir, workdir):
  return [sys.executable, "-m", "lmobjective.train", "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.data.cache_dir={cache_dir}"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def train_losses(workdir):
  return [(r["step"], r["train_loss"]) for r in metrics_log.read_metrics(str(workdir)) if "train_loss" in r]


def assert_same_params(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
  """An uninterrupted run."""
  workdir = tmp_path_factory.mktemp("ref") / "run"
  train.run(tiny(cache), str(workdir))
  return workdir


def _start_and_signal(cache, workdir, at_step, sig):
  """Starts the CLI, waits until metrics.jsonl has a train line for `at_step`, sends `sig`."""
  proc = subprocess.Popen(cli_args(cache, workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(workdir / "metrics.jsonl") and any(s >= at_step for s, _ in train_losses(workdir)):
      break
    time.sleep(0.02)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


@pytest.mark.slow
@pytest.mark.parametrize("window", [(1, 5), (8, 14)], ids=["early", "late"])
def test_kill_9_then_resume_gives_the_same_losses_and_params(tmp_path, cache, reference, window):
  kill_at = random.Random().randint(*window)
  workdir = tmp_path / "run"
  rc, _, _ = _start_and_signal(cache, workdir, kill_at, signal.SIGKILL)
  assert rc == -signal.SIGKILL
  killed_after = max(s for s, _ in train_losses(workdir))
  assert killed_after < 24, "the run finished before the kill; nothing was tested"
  train.run(tiny(cache), str(workdir))  # the same command again
  ref, got = train_losses(reference), train_losses(workdir)
  assert [s for s, _ in got] == list(range(1, 25)), f"duplicated or missing lines (kill at {killed_after})"
  assert got == ref, f"killed after step {killed_after}"  # exact float equality
  evals = [r["step"] for r in metrics_log.read_metrics(str(workdir)) if "val_loss" in r]
  assert evals == [0, 6, 12, 18, 24]
  assert_same_params(inspection.restore(str(workdir)).params, inspection.restore(str(reference)).params)
  shown = tensorboard_scalars(workdir, "train_loss")  # re-run steps replace the killed run's, once each
  assert [s for s, _ in shown] == list(range(1, 25))
  np.testing.assert_allclose([v for _, v in shown], [v for _, v in ref], rtol=1e-6)  # float32 in events


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_143(tmp_path, cache, reference):
  workdir = tmp_path / "run"
  rc, _, err = _start_and_signal(cache, workdir, 4, signal.SIGTERM)
  assert rc == train.EXIT_CODES[signal.SIGTERM] == 143, err
  last = max(s for s, _ in train_losses(workdir))
  assert last < 24
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved[-1] == last, (saved, last)  # a checkpoint of the step it was on, not only the periodic ones
  assert "received SIGTERM" in err
  train.run(tiny(cache), str(workdir))
  assert train_losses(workdir) == train_losses(reference)
  assert_same_params(inspection.restore(str(workdir)).params, inspection.restore(str(reference)).params)


def _damage(step_dir, mode):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state") for f in fs]
  data_files = [f for f in files if os.path.getsize(f) > 1000] or files
  for f in data_files:
    with open(f, "r+b") as fh:
      if mode == "truncate":
        fh.truncate(os.path.getsize(f) // 2)
      else:  # flip bytes in the middle of the array data
        fh.seek(os.path.getsize(f) // 2)
        chunk = fh.read(64)
        fh.seek(os.path.getsize(f) // 2)
        fh.write(bytes(b ^ 0xFF for b in chunk))


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path, cache, reference, capfd):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["21", "24"]
  _damage(workdir / "checkpoints" / "24", "truncate")
  train.run(tiny(cache), str(workdir))
  err = capfd.readouterr().err
  assert "warning: checkpoint at step 24 is damaged" in err, err
  assert os.path.isdir(workdir / "checkpoints_damaged" / "24")
  assert train_losses(workdir) == train_losses(reference)  # steps 22-24 retrained, identically
  assert_same_params(inspection.restore(str(workdir)).params, inspection.restore(str(reference)).params)


@pytest.mark.slow
def test_flipped_bytes_are_caught_by_the_checksum(tmp_path, reference, capfd):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  _damage(workdir / "checkpoints" / "24", "flip")
  run = inspection.restore(str(workdir))
  assert run.step == 21
  assert "checkpoint at step 24 is damaged" in capfd.readouterr().err


def test_checksum_changes_with_one_bit():
  x = {"a": jnp.arange(10, dtype=jnp.float32), "k": jax.random.key(0), "h": jnp.ones(3, jnp.bfloat16)}
  base = ckpt_lib.checksums(x)
  y = dict(x, a=x["a"].at[3].set(np.nextafter(np.float32(3), np.float32(4))))
  assert ckpt_lib.checksums(y)["a"] != base["a"] and ckpt_lib.checksums(y)["k"] == base["k"]


def test_changed_config_is_refused_in_one_line(tmp_path, cache, reference):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  r = subprocess.run(cli_args(cache, workdir) + ["--config.model.embed_dim=32", "--config.optimizer.b2=0.9"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert r.returncode == 1 and len(lines) == 1, r.stderr
  assert lines[0].startswith("error: ") and "model.embed_dim: 64 -> 32" in lines[0] and "optimizer.b2" in lines[0]
  with pytest.raises(config_lib.ConfigError, match="model.embed_dim"):  # the flag does not allow that one
    train.run(tiny(cache, **{"model.embed_dim": 32, "checkpoint.allow_config_change": True}), str(workdir))


@pytest.mark.slow
def test_more_steps_are_allowed_with_the_flag(tmp_path, cache, reference):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  with pytest.raises(config_lib.ConfigError, match="train.steps"):
    train.run(tiny(cache, **{"train.steps": 28}), str(workdir))
  train.run(tiny(cache, **{"train.steps": 28, "checkpoint.allow_config_change": True}), str(workdir))
  assert [s for s, _ in train_losses(workdir)] == list(range(1, 29))
  assert train_losses(workdir)[:24] == train_losses(reference)  # the schedule only moves after the resume


def _nan_at_step(monkeypatch, bad_step):
  original = step.train_step

  def poisoned(state, batch, **kw):
    new, metrics = original(state, batch, **kw)
    bad = new.step == bad_step
    return new, {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"])}

  monkeypatch.setattr(step, "train_step", poisoned)


@pytest.mark.slow
def test_nan_loss_stops_without_saving_and_skip_goes_on(tmp_path, cache, monkeypatch):
  _nan_at_step(monkeypatch, 5)
  stop_dir = tmp_path / "stop"
  with pytest.raises(train.NonFiniteLoss, match="step 5"):
    train.run(tiny(cache, **{"train.steps": 6, "checkpoint.every_steps": 1, "checkpoint.keep": 3}), str(stop_dir))
  assert sorted(int(d) for d in os.listdir(stop_dir / "checkpoints") if d.isdigit()) == [2, 3, 4]
  skip_dir = tmp_path / "skip"
  train.run(tiny(cache, **{"train.steps": 6, "checkpoint.every_steps": 1, "checkpoint.keep": 3,
                           "train.log_every_steps": 2, "train.nan_policy": "skip",
                           "train.max_skipped_fraction": 0.5}), str(skip_dir))
  records = {r["step"]: r for r in metrics_log.read_metrics(str(skip_dir)) if "train_loss" in r}
  assert sorted(records) == [2, 4, 6] and "skipped_steps" not in records[4]
  assert records[6]["skipped_steps"] == 1  # counted once, though checked at the save of 5 and the log at 6
  assert records[6]["train_loss"] == pytest.approx(records[6]["train_loss"]) and np.isfinite(records[6]["train_loss"])
  p4 = inspection.restore(str(skip_dir), step=4).params
  p5 = inspection.restore(str(skip_dir), step=5).params
  assert_same_params(p4, p5)  # the NaN step left the parameters alone


def test_keep_best_keeps_the_lowest_val_loss_besides_the_last(tmp_path):
  cfg = tiny(tmp_path, **{"checkpoint.keep": 2, "checkpoint.keep_best": True, "checkpoint.async_save": False})
  mngr = ckpt_lib.make_manager(str(tmp_path), cfg.checkpoint)
  for s, val in zip(range(1, 7), [5.0, 3.0, 4.0, 6.0, None, 7.0]):
    state = step.TrainState(step=jnp.asarray(s, jnp.int32), params={"w": jnp.full(3, float(s))},
                            opt_state=(), rng=jax.random.key(0))
    ckpt_lib.save(mngr, state, {}, cfg, val)
  mngr.wait_until_finished()
  assert sorted(mngr.all_steps()) == [2, 5, 6]  # the best (val 3.0) and the newest two
  mngr.close()


def test_a_signal_sets_the_stop_request_instead_of_raising():
  before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN under a shell's background job
  with train.preemption_signals() as stop:
    os.kill(os.getpid(), signal.SIGINT)  # would be KeyboardInterrupt without the handler
    time.sleep(0.05)
    assert stop.signum == signal.SIGINT and train.EXIT_CODES[stop.signum] == 130
  assert signal.getsignal(signal.SIGINT) is before  # restored afterwards


STAGE = "code=0.1,prose=0.2,markov=0.7"


class _StopAfter:
  """Stands in for preemption_signals(): reads as a SIGTERM from the n-th step on (deterministic)."""

  def __init__(self, n):
    self.n, self.reads = n, 0

  @property
  def signum(self):
    self.reads += 1
    return signal.SIGTERM if self.reads >= self.n else None


@pytest.mark.slow
def test_a_mixture_stage_added_on_resume_equals_having_it_from_the_start(tmp_path, cache, reference, monkeypatch):
  staged = tmp_path / "staged"
  train.run(tiny(cache, **{"data.mixture_stages": f"18:{STAGE}"}), str(staged))
  ref, got = train_losses(reference), train_losses(staged)
  assert got[:18] == ref[:18] and all(a != b for a, b in zip(got[18:], ref[18:]))  # the stage acts from 18 on
  workdir = tmp_path / "run"
  monkeypatch.setattr(train, "preemption_signals", contextlib.contextmanager(lambda: (yield _StopAfter(6))))
  with pytest.raises(train.Preempted):
    train.run(tiny(cache), str(workdir))  # no stage yet; preempted and saved at step 6
  monkeypatch.undo()
  assert inspection.restore(str(workdir)).step == 6
  with pytest.raises(config_lib.ConfigError, match="data.mixture_stages") as e:  # before step 6: refused
    train.run(tiny(cache, **{"data.mixture_stages": f"4:{STAGE}", "checkpoint.allow_config_change": True}),
              str(workdir))
  assert "\n" not in str(e.value)
  train.run(tiny(cache, **{"data.mixture_stages": f"18:{STAGE}", "checkpoint.allow_config_change": True}),
            str(workdir))
  assert train_losses(workdir) == train_losses(staged)  # exact: the same batches, the same steps
  last = lambda w: [r for r in metrics_log.read_metrics(str(w)) if "train_loss" in r][-1]
  assert {k: v for k, v in last(workdir).items() if k.startswith("tokens/")} == \
         {k: v for k, v in last(staged).items() if k.startswith("tokens/")}


def test_a_run_from_before_exclude_modules_compares_as_excluding_nothing(tmp_path):
  cfg = lambda **kw: ckpt_lib.config_json(tiny(tmp_path, **kw))
  older = cfg()
  for s in older["data"]["sources"].values():
    del s["exclude_modules"]
  assert ckpt_lib.config_changes(older, cfg()) == []
  name = next(iter(older["data"]["sources"]))
  key = f"data.sources.{name}.exclude_modules"
  assert ckpt_lib.config_changes(older, cfg(**{key: "textwrap"})) == [key]


def test_mixture_stage_changes_are_judged_by_the_batches_they_change(tmp_path):
  cfg = lambda stages="": ckpt_lib.config_json(tiny(tmp_path, **{"data.mixture_stages": stages}))
  older = cfg()
  del older["data"]["mixture_stages"]  # a run from before the key existed: no stages
  ckpt_lib.check_config(older, cfg(), False, 6)
  ckpt_lib.check_config(cfg(f"8:{STAGE}"), cfg(f" 8:{STAGE} ;"), False, 6)  # the same schedule, respelled
  ckpt_lib.check_config(cfg(), cfg(f"6:{STAGE}"), True, 6)  # from the checkpoint's step on: allowed
  for saved, current, allow in [(cfg(), cfg(f"6:{STAGE}"), False),  # a change needs the flag
                                (cfg(), cfg(f"5:{STAGE}"), True),  # batch 5 was trained on already
                                (cfg(f"4:{STAGE}"), cfg(), True)]:
    with pytest.raises(config_lib.ConfigError, match="data.mixture_stages") as e:
      ckpt_lib.check_config(saved, current, allow, 6)
    assert "\n" not in str(e.value)


def test_an_older_checkpoints_config_gains_the_added_keys_and_validates():
  import ml_collections
  from lmobjective.config import load_config_file
  from lmobjective.run import checkpoint as ckpt
  from lmobjective.validation import validate
  new = ckpt.config_json(load_config_file(os.path.join(ROOT, "configs", "default.py")))
  old = json.loads(json.dumps(new))
  for key in ckpt.ADDED_KEYS:
    section, leaf = key.split(".")
    del old[section][leaf]
  for source in old["data"]["sources"].values():
    for key in ckpt.ADDED_SOURCE_KEYS:
      del source[key]
  with pytest.raises(KeyError):
    validate(ml_collections.ConfigDict(old))
  filled = ckpt.with_added_keys(old)
  validate(ml_collections.ConfigDict(filled))
  assert filled == new  # a next-token run's added keys are the defaults
