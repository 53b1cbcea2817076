"""Named fault points for the fault-injection suite (`tests/faults/`), armed by an environment variable.

    LMOBJECTIVE_FAULTS="save.meta@2=kill,metrics.write=enospc" python -m lmobjective.train ...

Each entry is `point[:basename][@n]=action`: at the n-th time (default: every time) the program
passes `point(name)` (writing a file of that base name, if given), it does `action`:

  kill     SIGKILL this process (what kill -9 or an OOM killer does: no handler, no cleanup)
  enospc   raise OSError(ENOSPC, 'No space left on device', path): a full disk, in-process

Points (where they are passed):
  step           the top of every training step, before its batch is drawn (RL: of every iteration)
  update         before each optimizer update of an RL iteration (`run/rollout.py`)
  save.begin     a checkpoint save is about to start (nothing of it written yet)
  save.meta      inside the asynchronous part of a save, as its meta JSON is written (after the
                 state's arrays were handed to the writer): a kill here is kill -9 mid-save
  atomic.rename  `files.atomic_path`: the temporary file is complete, not yet renamed into place
  metrics.write  a line is about to be appended to metrics.jsonl
  reference.save the reference log-probs' cache is being written (`run/reference_cache.save`)

Unarmed (the variable unset), `point` is one dictionary lookup: it costs nothing in a real run.
"""

from __future__ import annotations

import collections
import errno
import os
import signal

ENV = "LMOBJECTIVE_FAULTS"
ACTIONS = ("kill", "enospc")
_hits: collections.Counter = collections.Counter()


def _armed(spec: str) -> list[tuple[str, int | None, str]]:
  out = []
  for entry in (e.strip() for e in spec.split(",") if e.strip()):
    where, _, action = entry.partition("=")
    name, _, nth = where.partition("@")
    if action not in ACTIONS:
      raise ValueError(f"{ENV}: {entry!r}: the action must be one of {ACTIONS}")
    out.append((name, int(nth) if nth else None, action))
  return out


def point(name: str, path: str | None = None) -> None:
  """Passes fault point `name` (`path`: the file being written, named by an injected error).

  An entry `name:BASENAME` counts and strikes only where `path`'s base name is BASENAME (e.g.
  `atomic.rename:config.json@1=kill`).
  """
  spec = os.environ.get(ENV)
  if not spec:
    return
  base = os.path.basename(path) if path else None
  for point_name, nth, action in _armed(spec):
    where, _, only = point_name.partition(":")
    if where != name or (only and only != base):
      continue
    _hits[point_name] += 1
    if nth is not None and nth != _hits[point_name]:
      continue
    if action == "kill":
      os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
