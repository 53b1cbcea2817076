"""Sweep runner: spec checks, resumable local runs, results table and plots, the SLURM array script."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from lmobjective import config as config_lib
from lmobjective.sweep import runner as sweep
from lmobjective.sweep import spec as sweep_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SPEC = """
def get_sweep(arg=None):
  steps = int(arg or 4)
  return {{"config": "configs/tiny.py",
          "overrides": {{"train.steps": steps, "eval.every_steps": steps, "checkpoint.every_steps": 2,
                        "data.cache_dir": {cache!r}, "data.tokenizer.sample_lines": 2000}},
          "grid": {grid}}}
"""
GRID = {"data.sources.markov.weight": [0.1, 0.5], "data.context_length": [16, 32]}


def write_spec(tmp_path, grid=GRID, name="spec.py"):
  path = tmp_path / name
  path.write_text(SPEC.format(cache=str(tmp_path.parent / "sweep_cache"), grid=grid))
  return str(path)


def cli(*args, **kw):
  return subprocess.Popen([sys.executable, "-m", "lmobjective.sweep", *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def events(workdir, kind):
  out = {}
  for e in sweep.read_log(workdir):
    if e["event"] == kind:
      out[e["run"]] = out.get(e["run"], 0) + 1
  return out


# ---- fast: the plan ----------------------------------------------------------------------------


def test_grid_expands_to_stable_readable_names(tmp_path):
  p = sweep.plan(write_spec(tmp_path), str(tmp_path / "s"), {"train.batch_size": "4"})
  assert list(p["runs"]) == ["weight=0.1_context_length=16", "weight=0.1_context_length=32",
                             "weight=0.5_context_length=16", "weight=0.5_context_length=32"]
  cmd = sweep.command(p, "weight=0.5_context_length=32")
  assert "--config.data.sources.markov.weight=0.5" in cmd and "--config.data.context_length=32" in cmd
  assert "--config.train.batch_size=4" in cmd  # command-line overrides reach every run
  assert f"--config.data.tokenizer.path={tmp_path / 's' / 'shared' / 'tokenizer'}" in cmd


def test_context_length_spec_holds_tokens_per_step(tmp_path):
  p = sweep.plan(os.path.join(ROOT, "experiments/context_length_ablation.py:quick"), str(tmp_path), {})
  cfgs = [sweep_spec.run_config(p["config"], ov) for ov in p["runs"].values()]
  assert [c.data.context_length for c in cfgs] == [64, 128, 256, 512]
  assert {c.train.batch_size * c.data.context_length * c.train.steps for c in cfgs} == {2048 * 300}
  assert {c.eval.batch_size * c.data.context_length for c in cfgs} == {4096}  # same validation text
  assert [config_lib.max_len(c) for c in cfgs] == [64, 128, 256, 512]  # max_len follows when unset
  mix = sweep.plan(os.path.join(ROOT, "experiments/mixture_ablation.py:quick"), str(tmp_path), {})
  assert len(mix["runs"]) == 8 and "code60-prose30-markov10" in mix["runs"]
  anneal = sweep.plan(os.path.join(ROOT, "experiments/anneal_ablation.py:quick"), str(tmp_path / "a"), {})
  cfgs = {n: sweep_spec.run_config(anneal["config"], ov) for n, ov in anneal["runs"].items()}
  assert cfgs["none"].data.mixture_stages == ""
  assert cfgs["anneal_markov"].data.mixture_stages == "160:code=0.15,prose=0.15,markov=0.7"
  assert "--config.data.mixture_stages=160:code=0.7,prose=0.15,markov=0.15" in sweep.command(anneal, "anneal_code")


@pytest.mark.parametrize("spec_text,needle", [
    ("x = 1", "no get_sweep"),
    ("def get_sweep(arg=None):\n  return {'config': 'configs/tiny.py'}", "exactly one of 'runs' or 'grid'"),
    ("def get_sweep(arg=None):\n  return {'config': 'configs/tiny.py', 'runs': {'a': {}}, 'gird': 1}",
     "unknown field 'gird'"),
    ("def get_sweep(arg=None):\n  return {'config': 'configs/nope.py', 'runs': {'a': {}}}", "base config not found"),
    ("def get_sweep(arg=None):\n  return {'config': 'configs/tiny.py', 'runs': {'a': {'train.stepz': 3}}}",
     "unknown config key: config.train.stepz"),
    ("def get_sweep(arg=None):\n  return {'config': 'configs/tiny.py', 'runs': {'a': {'train.steps': -3}}}",
     "run a: config.train.steps=-3"),
    ("def get_sweep(\n", "does not load: SyntaxError"),
])
def test_bad_spec_is_one_line_naming_it(tmp_path, spec_text, needle):
  (tmp_path / "bad.py").write_text(spec_text)
  with pytest.raises(sweep_spec.SweepError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
    sweep.plan(str(tmp_path / "bad.py"), str(tmp_path / "s"), {})
  assert "\n" not in str(e.value)


def test_overrides_take_the_type_of_the_field_they_set():
  cfg = sweep_spec.run_config(os.path.join(ROOT, "configs/tiny.py"), {
      "optimizer.learning_rate": "3", "train.steps": "7", "model.scan_layers": "true",
      "data.sources.markov.weight": 0.25, "model.compute_dtype": "bfloat16"})
  assert cfg.optimizer.learning_rate == 3.0 and isinstance(cfg.optimizer.learning_rate, float)
  assert cfg.train.steps == 7 and cfg.model.scan_layers is True
  assert cfg.data.sources.markov.weight == 0.25 and cfg.model.compute_dtype == "bfloat16"
  with pytest.raises(sweep_spec.SweepError, match="bad value for config.model.scan_layers: 'yes' is not a bool"):
    sweep_spec.run_config(os.path.join(ROOT, "configs/tiny.py"), {"model.scan_layers": "yes"})
  assert sweep_spec.parse_extra(["--config.a.b=1", "--config.c"]) == {"a.b": "1", "c": "True"}


def test_cli_unknown_override_key_is_one_line(tmp_path):
  out, _ = cli(f"--sweep={write_spec(tmp_path)}", f"--workdir={tmp_path / 's'}", "--config.train.foo=1").communicate()
  lines = [l for l in out.strip().splitlines() if l.strip()]
  assert lines == ["error: unknown config key: config.train.foo (not declared in the config file)"]
  assert not (tmp_path / "s").exists()


# ---- slow: real runs ---------------------------------------------------------------------------


@pytest.mark.slow
def test_interrupted_sweep_resumes_only_what_is_missing(tmp_path):
  spec, workdir = write_spec(tmp_path), str(tmp_path / "s")
  names = list(sweep.plan(spec, workdir, {})["runs"])
  first = cli(f"--sweep={spec}", f"--workdir={workdir}")
  deadline = time.time() + 300
  while not (sweep.is_done(os.path.join(workdir, names[0])) and os.path.exists(os.path.join(workdir, names[1]))):
    assert first.poll() is None and time.time() < deadline, first.communicate()[0]
    time.sleep(0.5)
  first.send_signal(signal.SIGTERM)  # interrupt while the second run trains
  first.communicate(timeout=120)
  assert [sweep.is_done(os.path.join(workdir, n)) for n in names] == [True, False, False, False]
  done_mtime = os.path.getmtime(os.path.join(workdir, names[0], sweep.DONE_FILE))

  out, _ = cli(f"--sweep={spec}", f"--workdir={workdir}").communicate(timeout=600)
  assert "4 runs: 1 already finished, 3 to run" in out, out
  assert all(sweep.is_done(os.path.join(workdir, n)) for n in names)
  assert os.path.getmtime(os.path.join(workdir, names[0], sweep.DONE_FILE)) == done_mtime
  assert events(workdir, "start") == {names[0]: 1, names[1]: 2, names[2]: 1, names[3]: 1}
  assert events(workdir, "done") == {n: 1 for n in names}

  with open(os.path.join(workdir, "results.csv")) as f:
    rows = {r["run"]: r for r in csv.DictReader(f)}
  assert list(rows) == names
  for col in ("data.sources.markov.weight", "data.context_length", "tokens_seen", "wall_s", "train_loss",
              "val_loss", "val_perplexity", "val_bits_per_byte", "val_loss/code", "val_loss/prose",
              "val_loss/markov", "val_bits_per_byte/prose", "findings", "weight/markov"):
    assert col in rows[names[0]], col
  for n, r in rows.items():
    ctx = int(r["data.context_length"])
    assert int(r["tokens_seen"]) == 4 * 8 * ctx  # steps x batch x context (concat packing)
    assert float(r["val_perplexity"]) == pytest.approx(math.exp(float(r["val_loss"])), rel=1e-6)
    assert float(r["weight/markov"]) == pytest.approx(float(r["data.sources.markov.weight"]) /
                                                      (0.9 + float(r["data.sources.markov.weight"])))
    assert r["status"] == "done" and float(r["wall_s"]) > 0
  position = json.load(open(os.path.join(workdir, names[1], "val_loss_by_position.json")))
  assert position["context_length"] == 32 and len(position["loss"]) == 32
  for png in ("sweep_loss_curves.png", "mixture_per_source.png", "context_length.png", "loss_by_position.png"):
    assert os.path.getsize(os.path.join(workdir, png)) > 10_000, png
  assert "| run | status |" in open(os.path.join(workdir, "results.md")).read()


@pytest.mark.slow
def test_slurm_script_runs_the_task_it_is_given(tmp_path):
  spec = write_spec(tmp_path, grid={"data.sources.markov.weight": [0.1, 0.5, 1.0]})
  workdir = str(tmp_path / "slurm")
  out, _ = cli(f"--sweep={spec}:2", f"--workdir={workdir}", "--launcher=slurm",
               "--slurm_header=--time=0:10:00").communicate(timeout=120)
  script = os.path.join(workdir, "sweep.sbatch")
  text = open(script).read()
  assert "#SBATCH --array=0-2" in text and "#SBATCH --time=0:10:00" in text and "SLURM_ARRAY_TASK_ID" in text
  assert not any(os.path.isdir(os.path.join(workdir, n)) for n in ("weight=0.1", "weight=0.5", "weight=1"))
  r = subprocess.run(["bash", script], env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"}, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  assert [sweep.is_done(os.path.join(workdir, n)) for n in ("weight=0.1", "weight=0.5", "weight=1")] == \
      [False, True, False]
  assert json.load(open(os.path.join(workdir, "weight=0.5", "config.json")))["train"]["steps"] == 2
  r = subprocess.run(["bash", script], env={k: v for k, v in os.environ.items() if k != "SLURM_ARRAY_TASK_ID"},
                     capture_output=True, text=True, timeout=60)
  assert r.returncode != 0 and "SLURM_ARRAY_TASK_ID" in r.stderr


def test_run_all_skips_finished_runs_and_runs_n_at_a_time(tmp_path, monkeypatch):
  import threading
  p = sweep.plan(write_spec(tmp_path), str(tmp_path / "s"), {})
  p["shared_tokenizer"] = False
  names = list(p["runs"])
  os.makedirs(os.path.join(p["workdir"], names[0]))
  open(os.path.join(p["workdir"], names[0], sweep.DONE_FILE), "w").write("{}")
  live, peak, launched, lock = [0], [0], [], threading.Lock()

  def fake_launch(plan, name):
    with lock:
      live[0] += 1
      peak[0] = max(peak[0], live[0])
      launched.append(name)
    time.sleep(0.3)
    with lock:
      live[0] -= 1
    return name != names[3]  # the last one fails

  monkeypatch.setattr(sweep, "launch", fake_launch)
  assert sweep.run_all(p, names, parallel=2) == [names[3]]
  assert sorted(launched) == sorted(names[1:]) and peak[0] == 2


def test_a_launch_caught_between_its_start_line_and_its_popen_by_the_stop_does_not_run(tmp_path, monkeypatch):
  """The race CI hit once: SIGTERM landed after run 2's directory and "start" line but before its subprocess
  was registered, so the sweep's stop missed it and it trained to the end and was marked done."""
  p = sweep.plan(write_spec(tmp_path), str(tmp_path / "s"), {})
  p["shared_tokenizer"] = False
  names = list(p["runs"])
  monkeypatch.setattr(sweep, "command", lambda plan, name: [sys.executable, "-c", "pass"])
  log = sweep._log

  def log_then_stop(workdir, **event):  # the interrupted main thread's `stop` runs right after run 2's start line
    log(workdir, **event)
    if event == {"event": "start", "run": names[1]}:
      sweep._CHILDREN.stop()

  monkeypatch.setattr(sweep, "_log", log_then_stop)
  assert sweep.run_all(p, names) == names[1:]
  assert [sweep.is_done(os.path.join(p["workdir"], n)) for n in names] == [True, False, False, False]
  assert events(p["workdir"], "done") == {names[0]: 1}


def test_position_loss_bins_are_token_weighted():
  from lmobjective.sweep import results
  x, y = results.log_binned([1, 2, 3, 4, 5, 6, 7, 8.0], [1, 1, 1, 1, 1, 1, 3, 1])
  np_x = [round(v, 4) for v in x]
  assert np_x == [1, 2, 3, 4, 5, 6.75, 8] and [round(v, 4) for v in y] == [1, 2, 3, 4, 5, 6.75, 8]
  x, y = results.log_binned([None, 2.0], [0, 5])  # a position no token reached is left out
  assert list(x) == [2] and list(y) == [2.0]
