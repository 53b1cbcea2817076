"""End-to-end runs of the training entry point on the tiny preset (derived from the default config)."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest

from lmobjective.analysis import post_run
from lmobjective.config import load_config_file
from lmobjective.run import experiment, metrics_log, train
from _tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(tmp_path, **overrides):
  return tiny_config(tmp_path / "cache", **overrides)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("tiny")
  workdir = str(tmp / "run")
  last_eval = train.run(tiny(tmp), workdir, post_run=post_run.STEPS)
  return workdir, last_eval


@pytest.mark.slow
def test_run_writes_every_output(tiny_run):
  workdir, last_eval = tiny_run
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["train"]["steps"] == 20 and cfg["data"]["context_length"] == 32
  assert cfg["model"]["max_len"] is None and cfg["optimizer"]["decay_steps"] is None  # follow the above
  records = metrics_log.read_metrics(workdir)
  train_lines = [r for r in records if "train_loss" in r]
  eval_lines = [r for r in records if "val_loss" in r]
  assert [r["step"] for r in train_lines] == list(range(1, 21))
  for key in ("step", "train_loss", "lr", "grad_norm", "tokens_seen", "positions_per_sec"):
    assert all(key in r for r in train_lines), key
  assert train_lines[-1]["tokens_seen"] == 20 * 8 * 32  # concat packing: every target is real
  assert [r["step"] for r in eval_lines] == [0, 10, 20]  # an eval before any update
  for r in eval_lines:
    assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-9)
    assert r["val_bits_per_token"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-9)
    assert {"val_loss/code", "val_loss/prose", "val_loss/markov", "val_bits_per_byte/code"} <= set(r)
  assert last_eval == eval_lines[-1]
  assert eval_lines[-1]["val_loss"] < eval_lines[0]["val_loss"]
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert os.path.getsize(os.path.join(workdir, "loss_curves.png")) > 10_000


@pytest.mark.slow
def test_per_source_token_accounting(tiny_run):
  workdir, _ = tiny_run
  last = [r for r in metrics_log.read_metrics(workdir) if "train_loss" in r][-1]
  counts = {k.split("/")[1]: v for k, v in last.items() if k.startswith("tokens/")}
  assert set(counts) == {"code", "prose", "markov"}
  assert sum(counts.values()) == last["tokens_seen"]
  assert sum(last[f"share/{n}"] for n in counts) == pytest.approx(1.0)


@pytest.mark.slow
def test_same_seed_same_losses_bit_for_bit(tmp_path, tiny_run):
  workdir, _ = tiny_run
  first = [r["train_loss"] for r in metrics_log.read_metrics(workdir) if "train_loss" in r]
  train.run(tiny(tmp_path), str(tmp_path / "again"))
  again = [r["train_loss"] for r in metrics_log.read_metrics(str(tmp_path / "again")) if "train_loss" in r]
  assert len(first) == 20 and first == again  # exact float equality, all 20 steps
  train.run(tiny(tmp_path, seed=1), str(tmp_path / "other"))
  other = [r["train_loss"] for r in metrics_log.read_metrics(str(tmp_path / "other")) if "train_loss" in r]
  assert other != first


@pytest.mark.slow
def test_markov_chain_reaches_its_entropy_rate(tmp_path):
  """A small model on a first-order chain ends within 3% of the chain's exact entropy rate."""
  cfg = load_config_file(os.path.join(ROOT, "configs/markov.py"))
  cfg.data.cache_dir = str(tmp_path / "cache")
  cfg.eval.num_batches = 16
  last_eval = train.run(cfg, str(tmp_path / "markov"))
  from lmobjective import data
  tok = data.build_tokenizer(cfg.data, str(tmp_path / "markov"))
  pipe = data.build_pipeline(cfg.data, tok, seed=cfg.seed, batch_size=1, cache_dir=cfg.data.cache_dir)
  floor = pipe.stats()["sources"]["markov"]["entropy_rate_nats"]
  first = metrics_log.read_metrics(str(tmp_path / "markov"))[0]["val_loss"]
  assert first > 5.0  # starts near ln V (V = 256 bytes + specials), far above the floor
  assert abs(last_eval["val_loss"] / floor - 1) < 0.03, (last_eval["val_loss"], floor)


def _cli(tmp_path, *overrides):
  cmd = [sys.executable, "-m", "lmobjective.train", "--config=configs/tiny.py",
         f"--workdir={tmp_path / 'bad'}", *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override,key", [
    ("--config.train.steps=-1", "config.train.steps"),
    ("--config.model.num_heads=0", "config.model.num_heads"),
    ("--config.model.embed_dim=65", "config.model.embed_dim"),  # tiny has 2 heads
    ("--config.model.embed_dim=66", "config.model.embed_dim"),  # head dim 33: rope needs it even
    ("--config.train.foo=1", "config.train.foo"),
    ("--config.optimizer.b2=1.5", "config.optimizer.b2"),
    ("--config.data.context_length=0", "config.data.context_length"),
    ("--config.data.sources.code.weight=-1", "config.data.sources.code.weight"),
    ("--config.data.mixture_stages=5:code=1,prose=1", "config.data.mixture_stages"),
])
def test_bad_config_stops_with_one_line_naming_the_key(tmp_path, override, key):
  r = _cli(tmp_path, override)
  assert r.returncode != 0
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith("error: ") and key in lines[0], lines[0]
  assert not (tmp_path / "bad").exists()  # nothing half written


@pytest.mark.slow
def test_positions_per_sec_counts_device_time_not_dispatch(tmp_path):
  """Each step is made to take >= 20 ms on the device (a callback inside the jitted program, so the
  host's dispatch returns at once): positions_per_sec must count that time, which it does only when
  the clock is read after the metrics reach the host."""
  import dataclasses
  import time
  import types

  import jax
  import jax.numpy as jnp

  step_seconds, per_step = 0.02, 8 * 32
  cfg = tiny(tmp_path, **{"train.steps": 12, "train.log_every_steps": 4, "eval.num_batches": 0})
  exp = experiment.build(cfg, str(tmp_path / "run"))
  nap = lambda x: (time.sleep(step_seconds), x)[1]
  slow = jax.jit(lambda m: {**m, "loss": jax.pure_callback(nap, jax.ShapeDtypeStruct((), jnp.float32), m["loss"])})
  fast_fn = exp.train_fn
  exp = dataclasses.replace(exp, train_fn=lambda s, b: (lambda s2, m: (s2, slow(m)))(*fast_fn(s, b)))
  records = []
  writer = types.SimpleNamespace(write=records.append)
  train.run_loop(exp, exp.init_fn(jax.random.key(0)), exp.pipeline.train_iterator(), writer,
                 train.TokenAccounting(exp.pipeline.source_names))
  tps = [r["positions_per_sec"] for r in records if "positions_per_sec" in r]
  assert len(tps) == 3
  assert max(tps) <= per_step / step_seconds  # timed before the sync it would be far higher
  assert min(tps[1:]) >= per_step / (step_seconds + 0.5)  # and not slowed by anything but the steps


def _window(*steps):
  """Host metrics as train_step returns them, one dict per (num_tokens, loss, correct_sum, z_sum)."""
  import numpy as np
  f32 = np.float32
  return [{"num_tokens": np.int32(n), "loss": f32(loss), "correct_sum": f32(c), "z_sum": f32(z),
           "lr": f32(1e-3), "grad_norm": f32(1), "update_norm": f32(1), "param_norm": f32(1)}
          for n, loss, c, z in steps]


def test_train_line_weights_the_window_by_tokens_and_names_its_counts():
  import types
  cfg = tiny_config("/unused", **{"objective.z_loss": 1e-4})
  from lmobjective import objectives
  exp = types.SimpleNamespace(config=cfg, peak_flops=1e12, flops_per_token=1e6, objective=objectives.from_config(cfg.objective),
                              pipeline=types.SimpleNamespace(rows_per_example=1))
  # 10, 30 and 60 scored tokens: last-step values and means of per-step means would each differ
  window = _window((10, 2.0, 5, 20), (30, 1.0, 6, 90), (60, 0.5, 30, 60))
  rec = train._train_record(exp, 3, window, seconds=2.0, tokens_before=1000)
  assert rec["train_loss"] == pytest.approx((20 + 30 + 30) / 100, rel=1e-7)  # not 0.5, not 7/6
  assert rec["train_accuracy"] == pytest.approx(41 / 100, rel=1e-7)  # not 0.5 (last), not 0.4
  assert rec["z_loss"] == pytest.approx(170 / 100, rel=1e-7)  # not 1.0 (last), not 2.0
  assert rec["tokens_seen"] == 1000 + 100  # scored targets
  positions = 3 * cfg.train.batch_size * cfg.data.context_length  # every input slot, scored or not
  assert rec["positions_per_sec"] == pytest.approx(positions / 2.0, rel=1e-12)
  assert "tokens_per_sec" not in rec  # the old name counted positions: gone, not redefined
  import jax
  assert rec["mfu"] == pytest.approx(positions / 2.0 * 1e6 / (1e12 * jax.device_count()), rel=1e-12)


def test_pending_metrics_from_an_older_checkpoint_get_sums():
  import numpy as np
  old = {"num_tokens": np.int32(40), "loss": np.float32(2.0), "accuracy": np.float32(0.25),
         "z_loss": np.float32(3.5)}  # the step's means, as steps reported them before the sums
  from lmobjective.objectives import next_token
  upgrade = next_token.NextToken().restored_metrics
  new = upgrade(dict(old))
  assert new["correct_sum"] == 10 and new["z_sum"] == 140 and "accuracy" not in new
  assert upgrade(dict(new)) == new


@pytest.mark.slow
def test_the_library_entry_point_runs_no_analysis_unless_asked(tmp_path):
  """train.run alone writes checkpoints and metrics but no plots, position losses or diagnostics;
  the CLI passes post_run.STEPS, and the module of the loop imports none of them."""
  import ast

  workdir = tmp_path / "plain"
  train.run(tiny(tmp_path, **{"train.steps": 2, "eval.every_steps": 2, "checkpoint.every_steps": 2}), str(workdir))
  assert (workdir / "metrics.jsonl").exists() and (workdir / "checkpoints").is_dir()
  for name in ("loss_curves.png", "val_loss_by_position.json", "diagnostics.json"):
    assert not (workdir / name).exists(), name
  tree = ast.parse(open(train.__file__).read())
  imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
  assert not imported & {"diagnose", "plotting", "position_loss"}, imported
