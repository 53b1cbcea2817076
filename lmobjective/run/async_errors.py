"""Orbax's abandoned asynchronous operations, kept off the terminal (their failure is reported in one line).

When one read or write of a checkpoint fails, orbax gives up on its event loop while
tensorstore's other operations are in flight: their coroutines are dropped unawaited, their
futures' errors are never retrieved, and their callbacks find the loop closed, each printing a
traceback when it ends (as late as process exit). `quiet()` filters exactly those.
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings

_SOURCES = ("TensorStore", "OCDBT", "orbax", "tensorstore")


def _quiet(unraisable) -> bool:
  value, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
  return (isinstance(value, RuntimeError) and "Event loop is closed" in str(value)) or (
      code is not None and "orbax" in code.co_filename)


class _AsyncioNoise(logging.Filter):
  """asyncio's 'exception was never retrieved' records for orbax's/tensorstore's dropped operations."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if "never retrieved" not in text:
      return True
    if record.exc_info and record.exc_info[2] is not None:  # the message names only the error: its frames say whose
      text += "".join(f.filename for f in traceback.extract_tb(record.exc_info[2]))
    return not any(w in text for w in _SOURCES)


def quiet() -> None:
  """Keeps (once per process) the tracebacks of orbax's abandoned asynchronous operations out of
  stderr: a `sys.unraisablehook`, an `asyncio` log filter and a warnings filter, each passing
  everything else on.

  When one read or write of a checkpoint fails, orbax gives up on its event loop while
  tensorstore's other operations are in flight: their coroutines are dropped unawaited, their
  futures' errors never retrieved, and their callbacks find the loop closed, each printing a
  traceback when it ends (as late as process exit). The failure itself is reported in one line
  (a damaged checkpoint's warning, `SaveFailed`); this project runs no coroutines of its own.
  """
  hook = sys.unraisablehook
  if getattr(hook, "lmobjective_quiet", False):
    return

  def quiet(unraisable) -> None:
    if not _quiet(unraisable):
      hook(unraisable)

  quiet.lmobjective_quiet = True
  sys.unraisablehook = quiet
  logging.getLogger("asyncio").addFilter(_AsyncioNoise())
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
