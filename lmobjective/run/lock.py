"""One run per workdir: a lease file (`WORKDIR/.lock`) that the run's lead process renews while it lives.

A second run on a workdir that a live run holds refuses in one line naming the holder (pid, host,
since when). A lock left by a dead run is taken over: on this host when its pid is gone (kill -9),
on any host when its lease has not been renewed for `stale_after_s` (a host that vanished).
Readers (`restore`, `evaluate`, `diagnose`, later stages that start from a run) never take it.
A workdir the lock created is removed again on release if the run left nothing else in it (it
failed before writing), so a refused run leaves no trace.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

from lmobjective import files
from lmobjective.config import ConfigError

LOCK_FILE = ".lock"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def describe(held: dict) -> str:
  """A holder's record (`WorkdirLock.holder()`) in words: 'pid P on HOST since YYYY-MM-DD HH:MM:SS'."""
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("since", 0))))
  return f"pid {held['pid']} on {held.get('host')} since {since}"


class WorkdirLock:
  """`with WorkdirLock(workdir):` owns the workdir for the block (lead process only)."""

  def __init__(self, workdir: str, renew_every_s: float = 10.0, stale_after_s: float = 60.0):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.renew_every_s, self.stale_after_s = renew_every_s, stale_after_s
    self.me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    self.workdir = workdir
    self._created = False
    self._stop = threading.Event()
    self._thread = None

  def holder(self) -> dict | None:
    """The live holder's record, or None if the workdir is free or its lock is stale."""
    held = files.read_json(self.path)
    if not isinstance(held, dict) or held.get("pid") is None:
      return None
    if held.get("host") == self.me["host"]:
      return held if _alive(int(held["pid"])) and int(held["pid"]) != self.me["pid"] else None
    return held if time.time() - float(held.get("renewed", 0)) < self.stale_after_s else None

  def acquire(self) -> None:
    held = self.holder()
    if held is not None:
      raise ConfigError("workdir", os.path.dirname(self.path),
                        f"in use by {describe(held)} ({self.path}); wait for it, or use another workdir")
    self._created = not os.path.exists(self.workdir)
    self._write()
    if files.read_json(self.path, {}).get("pid") != self.me["pid"]:  # another run took it at the same moment
      raise ConfigError("workdir", os.path.dirname(self.path), "taken by another run just now; use another workdir")
    self._thread = threading.Thread(target=self._renew, daemon=True)
    self._thread.start()

  def _write(self) -> None:
    files.write_json(self.path, {**self.me, "renewed": time.time()})

  def _renew(self) -> None:
    warned = False
    while not self._stop.wait(self.renew_every_s):
      try:
        self._write()
      except OSError as e:  # a full disk: the loop reports its own failed writes; keep trying
        if not warned:
          print(f"warning: cannot renew the workdir lock {self.path} ({e.strerror})", file=sys.stderr, flush=True)
          warned = True

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if files.read_json(self.path, {}).get("pid") == self.me["pid"]:
      os.remove(self.path)
    if self._created and os.path.isdir(self.workdir) and not os.listdir(self.workdir):
      os.rmdir(self.workdir)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
