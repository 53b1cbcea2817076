"""A run's saves, watched: a save that fails (a full disk, a lost mount) stops the run in one line.

Orbax reports errors of its asynchronous writer only by logging them with their traceback;
`SaveWatch` keeps those records instead, so the loop can stop on them (`SaveFailed`, naming the
path and the last good checkpoint, which is intact). `WriteFailed` is the same for the run's
other files.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import threading

from lmobjective import faults
from lmobjective.run import async_errors, checkpoint


class WriteFailed(RuntimeError):
  """A run's file could not be written (a full disk, a lost mount); the message names the path and
  the last good checkpoint, which is intact."""


class SaveFailed(WriteFailed):
  """A checkpoint save did not complete."""


def last_good(workdir: str, exclude: int | None = None) -> str:
  """What the researcher can do next, from the complete checkpoints on disk."""
  good = [s for s in checkpoint.finalized_steps(workdir) if s != exclude]
  if not good:
    return "there is no earlier checkpoint: rerun the same command to start again"
  return (f"the last good checkpoint, step {max(good)} ({os.path.join(workdir, checkpoint.CKPT_DIR, str(max(good)))}), "
          "is intact: rerun the same command to resume from it")


class SaveWatch(logging.Filter):
  """Watches a run's saves: keeps the errors orbax's asynchronous writer logs (instead of their
  tracebacks) and, from them, raises `SaveFailed` at the next `check`. The loop dispatches the
  step after a save, then waits for the save's write while that step computes (the write still
  overlaps the device's work), so a failed save stops the run before that step counts.

  Install with `with SaveWatch(mngr, workdir) as watch:`; `watch.save(...)` starts a save.
  """

  def __init__(self, mngr, workdir: str):
    super().__init__()
    self.mngr, self.workdir = mngr, workdir
    self.errors: list[BaseException] = []
    self.pending: int | None = None  # the step of the last save started and not yet confirmed
    self.failed: int | None = None  # the step of a save that failed (its partial directory is removed on exit)

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and "orbax" in record.pathname:
      self.errors.append(record.exc_info[1])
      return False
    return True

  def __enter__(self):
    logging.getLogger("absl").addFilter(self)
    async_errors.quiet()
    return self

  def __exit__(self, *exc):
    if self.failed is not None:
      # One write failed; the save's other writes run on in orbax's threads: let them end (their
      # errors are kept here, too), then drop the partial save.
      for t in threading.enumerate():
        if type(t).__module__.startswith("orbax") and t is not threading.current_thread():
          with contextlib.suppress(Exception):  # orbax's threads re-raise their own error from join(); one is reported
            t.join(timeout=60)
      for tmp in glob.glob(os.path.join(self.workdir, checkpoint.CKPT_DIR, f"{self.failed}.orbax-checkpoint-tmp*")):
        shutil.rmtree(tmp, ignore_errors=True)
    logging.getLogger("absl").removeFilter(self)

  def save(self, state, meta: dict, config, val_loss=None) -> None:
    step = int(state.step)
    self.check(wait=True)  # the previous save first (orbax would wait for it too): its failure is its own
    try:
      faults.point("save.begin", os.path.join(self.workdir, checkpoint.CKPT_DIR, str(step)))
      if checkpoint.save(self.mngr, state, meta, config, val_loss):
        self.pending = step
    except OSError as e:
      self._fail(step, e)

  def check(self, wait: bool = False) -> None:
    """Raises SaveFailed if the last save failed (`wait`: block until a save in flight finished)."""
    if wait and self.pending is not None:
      try:
        self.mngr.wait_until_finished()
      except Exception as e:  # the writer's error, re-raised by the wait (else only logged: `errors`)
        self._fail(self.pending, e)
    if self.errors:
      self._fail(self.pending, self.errors[0])
    if self.pending is not None and not self.mngr.is_saving_in_progress():
      if not os.path.isdir(os.path.join(self.workdir, checkpoint.CKPT_DIR, str(self.pending))):
        self._fail(self.pending, None)
      self.pending = None

  def _fail(self, step: int | None, error: BaseException | None):
    self.failed, self.errors, self.pending = step, [], None
    where = os.path.join(self.workdir, checkpoint.CKPT_DIR, str(step))
    raise SaveFailed(f"checkpoint save at step {step} failed ({_reason(error, where)}); "
                     f"{last_good(self.workdir, exclude=step)}") from None


def _reason(error: BaseException | None, where: str) -> str:
  """The failure in a few words: OSError's strerror and file; tensorstore's status and file (the
  save's directory `where` when the error names none)."""
  if error is None:
    return "it was not finalized"
  if isinstance(error, OSError) and error.strerror:
    return f"{error.strerror}: {error.filename or where}"
  text = str(error).strip()
  status = re.match(r"([A-Z_]{4,}): ", text)
  file = re.search(r'(?:local file|Failed writing:) "([^"]+)"', text)
  if status and file:  # tensorstore: RESOURCE_EXHAUSTED is a full disk
    what = "No space left on device" if status.group(1) == "RESOURCE_EXHAUSTED" else status.group(1)
    return f"{what}: {file.group(1)}"
  return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"
