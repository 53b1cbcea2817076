"""lmobjective/run/schedule.py: stages in dependency order, `jobs` at a time, one XLA cache, one-line failures."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lmobjective.run import schedule

# A stage that records when it ran and the cache it was given, then sleeps (or fails).
STAGE = ("import json, os, sys, time; t0 = time.time(); time.sleep(float(sys.argv[2])); "
         "print('stage', sys.argv[1], 'ran', flush=True); "
         "json.dump({'start': t0, 'end': time.time(), 'cache': os.environ.get('JAX_COMPILATION_CACHE_DIR')}, "
         "open(sys.argv[1] + '.json', 'w')); sys.exit(int(sys.argv[3]))")


def _stage(tmp_path, name, seconds=0.3, after=(), code=0, finished=False):
  return schedule.Stage(name, ["-c", STAGE, str(tmp_path / name), str(seconds), str(code)], after, finished)


def _times(tmp_path, name):
  with open(tmp_path / f"{name}.json") as f:
    return json.load(f)


def test_a_stage_starts_after_the_stages_it_needs_and_two_run_at_once(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  stages = [_stage(tmp_path, "a", 1.0), _stage(tmp_path, "b", 0.2), _stage(tmp_path, "c", 0.1, after=("a",))]
  seconds = schedule.run(stages, str(tmp_path), jobs=2)
  a, b, c = (_times(tmp_path, n) for n in "abc")
  assert a["start"] < b["end"] and b["start"] < a["end"]  # a and b overlapped
  assert c["start"] >= a["end"]  # c waited for a
  assert set(seconds) == {"a", "b", "c"}
  assert a["cache"] == os.path.join(str(tmp_path), schedule.CACHE_DIR)
  out = capsys.readouterr().out
  for name in "abc":  # every stage's log reached the terminal, whole
    assert f"stage {tmp_path / name} ran" in out and f"== {name}: done in" in out
    assert os.path.exists(tmp_path / schedule.LOG_DIR / f"{name}.log")


def test_one_at_a_time_runs_in_list_order(tmp_path):
  stages = [_stage(tmp_path, "a"), _stage(tmp_path, "b")]
  schedule.run(stages, str(tmp_path), jobs=1)
  assert _times(tmp_path, "b")["start"] >= _times(tmp_path, "a")["end"]
  assert not os.path.exists(tmp_path / schedule.LOG_DIR)  # its output went to the terminal


def test_finished_stages_are_reused_not_run(tmp_path):
  schedule.run([_stage(tmp_path, "a", finished=True), _stage(tmp_path, "b", after=("a",))], str(tmp_path), jobs=2)
  assert not os.path.exists(tmp_path / "a.json") and os.path.exists(tmp_path / "b.json")


def test_a_failed_stage_stops_the_others_and_names_itself(tmp_path):
  stages = [_stage(tmp_path, "slow", 30.0), _stage(tmp_path, "bad", 0.1, code=3), _stage(tmp_path, "next", after=("bad",))]
  with pytest.raises(SystemExit) as e:
    schedule.run(stages, str(tmp_path), jobs=2)
  assert str(e.value) == (f"error: stage bad exited with status 3; its log: "
                          f"{os.path.join(str(tmp_path), schedule.LOG_DIR, 'bad.log')}")
  assert not os.path.exists(tmp_path / "slow.json") and not os.path.exists(tmp_path / "next.json")  # stopped, not started


# A stage that marks it started, then on SIGTERM marks it stopped and exits 143 (as a training run does after saving).
STOPPABLE = ("import signal, sys, time, pathlib; d = pathlib.Path(sys.argv[1]); "
             "signal.signal(signal.SIGTERM, lambda *_: (d.with_suffix('.stopped').write_text('1'), sys.exit(143))); "
             "d.with_suffix('.started').write_text('1'); time.sleep(60)")
DRIVER = """import sys
from lmobjective.run import schedule
stop = lambda name, *after: schedule.Stage(name, ["-c", {stage!r}, {d!r} + "/" + name], after)
schedule.run([stop("a"), stop("b"), stop("c", "a")], {d!r}, jobs=2)
"""


def test_sigterm_to_the_driver_stops_every_running_stage_starts_no_other_and_exits_143(tmp_path):
  driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(stage=STOPPABLE, d=str(tmp_path))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 60
  while not ((tmp_path / "a.started").exists() and (tmp_path / "b.started").exists()):
    assert driver.poll() is None and time.time() < deadline, driver.communicate()[0]
    time.sleep(0.05)
  driver.send_signal(signal.SIGTERM)
  out, _ = driver.communicate(timeout=60)
  assert driver.returncode == 143, out
  assert "== stopping a, b: each saves a checkpoint and exits; the same command goes on from there" in out
  assert (tmp_path / "a.stopped").exists() and (tmp_path / "b.stopped").exists()  # each got to save
  assert not (tmp_path / "c.started").exists()


def test_a_stage_needing_one_not_listed_before_it_is_refused_before_anything_runs(tmp_path):
  with pytest.raises(ValueError, match="stage 'b' comes after \\['c'\\], which are not listed before it"):
    schedule.run([_stage(tmp_path, "b", after=("c",)), _stage(tmp_path, "c")], str(tmp_path), jobs=2)
  assert not os.listdir(tmp_path)


def test_an_argv_callable_is_built_when_the_stage_starts(tmp_path):
  built = []
  later = schedule.Stage("b", lambda: built.append(os.path.exists(tmp_path / "a.json")) or ["-c", "pass"], ("a",))
  schedule.run([_stage(tmp_path, "a"), later], str(tmp_path), jobs=2)
  assert built == [True]  # after a had written its output


def test_default_jobs_is_one_where_a_gpu_plugin_is_installed(monkeypatch):
  monkeypatch.setattr(schedule.importlib.util, "find_spec", lambda m: m == "jax_cuda12_plugin" or None)
  assert schedule.default_jobs() == 1
  monkeypatch.setattr(schedule.importlib.util, "find_spec", lambda m: None)
  monkeypatch.setattr(schedule.os, "cpu_count", lambda: 8)
  assert schedule.default_jobs() == 2


@pytest.mark.parametrize("text", ["0", "-1", "two"])
def test_the_jobs_flag_refuses_what_is_not_a_positive_count_in_one_line(text, capsys):
  import argparse
  parser = argparse.ArgumentParser()
  schedule.add_jobs_flag(parser)
  assert parser.parse_args(["--jobs=2"]).jobs == 2 and parser.parse_args([]).jobs is None
  with pytest.raises(SystemExit):
    parser.parse_args([f"--jobs={text}"])
  assert f"argument --jobs: must be a positive integer, got {text!r}" in capsys.readouterr().err
