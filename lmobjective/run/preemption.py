"""Graceful stop on SIGTERM / SIGINT: the loop finishes its step, saves a checkpoint and exits.

Exit status 128 + signal number, the shell's convention, so schedulers read it as "terminated"
rather than a crash: 143 after SIGTERM, 130 after SIGINT. A second signal acts at once (default
handler), so a stuck save can still be interrupted.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Preempted(SystemExit):
  """Raised by `train.run` after a SIGTERM/SIGINT was handled (checkpoint saved); `.code` is the exit status."""


class StopRequest:
  signum: int | None = None


@contextlib.contextmanager
def preemption_signals():
  """SIGTERM/SIGINT set `.signum` of the yielded request (the loop then saves and exits)."""
  stop = StopRequest()
  if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
    yield stop
    return

  def handler(signum, frame):
    stop.signum = signum
    signal.signal(signum, signal.SIG_DFL)
    print(f"\nreceived {signal.Signals(signum).name}: finishing the step, saving a checkpoint, exiting "
          f"with {EXIT_CODES[signum]}", file=sys.stderr, flush=True)

  previous = {sig: signal.signal(sig, handler) for sig in EXIT_CODES}
  try:
    yield stop
  finally:
    for sig, h in previous.items():
      signal.signal(sig, h)
