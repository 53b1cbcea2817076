"""run/lock.py: one run per workdir; a dead run's lock (kill -9, a vanished host) is taken over."""

import json
import os
import subprocess
import sys
import time

import pytest

from lmobjective.config import ConfigError
from lmobjective.run import lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(workdir, **record):
  os.makedirs(workdir, exist_ok=True)
  (workdir / lock.LOCK_FILE).write_text(json.dumps(record))


def test_a_live_holder_refuses_a_second_run_in_one_line(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write(tmp_path, pid=holder.pid, host=lock.socket.gethostname(), since=time.time(), renewed=time.time())
    with pytest.raises(ConfigError, match=rf"config.workdir='{tmp_path}': in use by pid {holder.pid} on "):
      lock.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()
    holder.wait()


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _write(tmp_path, pid=dead.pid, host=lock.socket.gethostname(), since=0, renewed=time.time())
  with lock.WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert not (tmp_path / lock.LOCK_FILE).exists()  # released on exit


def test_another_hosts_lock_holds_while_renewed_and_goes_stale(tmp_path):
  _write(tmp_path, pid=1, host="elsewhere", since=0, renewed=time.time())
  with pytest.raises(ConfigError, match="in use by pid 1 on elsewhere"):
    lock.WorkdirLock(str(tmp_path), stale_after_s=60).acquire()
  _write(tmp_path, pid=1, host="elsewhere", since=0, renewed=time.time() - 61)
  with lock.WorkdirLock(str(tmp_path), stale_after_s=60):
    pass


def test_the_lease_is_renewed_while_the_run_lives(tmp_path):
  with lock.WorkdirLock(str(tmp_path), renew_every_s=0.05) as held:
    first = json.loads((tmp_path / lock.LOCK_FILE).read_text())["renewed"]
    time.sleep(0.3)
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["renewed"] > first
    assert held.holder() is None  # its own lock never blocks the holder


@pytest.mark.slow
def test_two_training_runs_on_one_workdir(tmp_path):
  """The second CLI run, started while the first trains, exits 1 with one line and changes nothing."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "lmobjective.train", "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.train.steps=400", "--config.eval.every_steps=400",
         "--config.checkpoint.every_steps=400"]
  first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while not (workdir / "metrics.jsonl").exists() and time.time() < deadline:
      time.sleep(0.5)
    before = (workdir / "config.json").read_text()
    second = subprocess.run(cmd + ["--config.seed=1"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert second.returncode == 1, second.stderr[-2000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: config.workdir='{workdir}': in use by pid {first.pid} on "), last
    assert (workdir / "config.json").read_text() == before
  finally:
    first.terminate()
    first.communicate(timeout=120)
  assert first.returncode == 143  # preempted by our SIGTERM, checkpoint saved, lock released
  assert not (workdir / lock.LOCK_FILE).exists()
