"""Run outputs: metrics.jsonl (one JSON object per line), TensorBoard scalars, a console progress line.

Only the lead process (index 0) writes. Lines are appended and flushed as they come, so a killed
run keeps every line it printed. A line is readable when it is UTF-8 JSON for an object with an
integer "step" (`parse_line`); `read_metrics` skips the others, and a resume (`truncate_metrics`)
moves them to `metrics.unreadable.jsonl` (`set_aside`): no line is ever deleted for being unreadable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Iterable

from lmobjective import faults, files

METRICS_FILE = "metrics.jsonl"
UNREADABLE_FILE = "metrics.unreadable.jsonl"
FLUSH_SECS = 10  # TensorBoard events reach the disk at least this often (and at every checkpoint)


class MetricsWarning(UserWarning):
  """metrics.jsonl holds lines that are not metric records; they were skipped."""


def _jsonable(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf; keep them visible as strings
  return v


class _EventFile:
  """TensorBoard scalars written synchronously: one events file, and `flush` puts every event added
  so far on disk. (tensorboardX's SummaryWriter queues events for a worker thread, and its flush
  does not drain that queue, so a kill -9 right after it could lose the last steps' events.)"""

  def __init__(self, logdir: str, purge_step: int | None):
    EventsWriter, Event, SessionLog, scalar = _tensorboardx()
    os.makedirs(logdir, exist_ok=True)
    self._Event, self._scalar = Event, scalar
    self._flushed = time.time()
    self._events = EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}")  # a quick restart: its own file
    if purge_step is not None:  # as tensorboardX writes it: TensorBoard drops earlier files' events >= it
      self._events.write_event(Event(step=purge_step, wall_time=time.time(),
                                     session_log=SessionLog(status=SessionLog.START)))

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    now = time.time()
    self._events.write_event(self._Event(summary=self._scalar(tag, value), step=step, wall_time=now))
    if now - self._flushed > FLUSH_SECS:  # a live TensorBoard sees the run's curves
      self.flush()

  def flush(self) -> None:
    self._events.flush()
    self._flushed = time.time()

  def close(self) -> None:
    self._events.close()


def _tensorboardx():
  """The four pieces of tensorboardX used here. Importing any of its modules runs its package
  `__init__`, whose `SummaryWriter` imports torch when it is installed (1.5 s of a run's start-up on
  a 2-core CPU, for an optional type check); unless torch is imported already, it is hidden for
  that import (tensorboardX catches the ImportError) and visible again right after."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.summary import scalar
  finally:
    if hide:
      del sys.modules["torch"]
  return EventsWriter, Event, SessionLog, scalar


class MetricsWriter:
  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
               purge_step: int | None = None):
    """purge_step: TensorBoard drops the events of earlier files at steps >= it (a resumed run
    passes its checkpoint step + 1, a fresh one 0), as `truncate_metrics` does here."""
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")
      if tensorboard:
        self._tb = _EventFile(os.path.join(workdir, "tensorboard"), purge_step)

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {k: _jsonable(v) for k, v in record.items()}
    faults.point("metrics.write", self.path)
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      step = int(record["step"])
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, step)

  def flush(self) -> None:
    """Everything written so far on disk, TensorBoard events included."""
    if self.enabled and self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


@dataclasses.dataclass(frozen=True)
class Line:
  """One line of a metrics file: `raw` as on disk (newline included, if it has one); `record` is
  None for an unreadable line, and `reason` then says why."""
  number: int  # 1-based
  raw: bytes
  record: dict[str, Any] | None
  reason: str = ""

  @property
  def torn(self) -> bool:
    """Unreadable and without a newline: the last line of a process killed (or still) writing it."""
    return self.record is None and not self.raw.endswith(b"\n")


def parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str]:
  """(record, "") for UTF-8 JSON of an object with an integer "step", else (None, the reason)."""
  try:
    rec = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    return None, f"UnicodeDecodeError: invalid UTF-8 at byte {e.start}"
  except json.JSONDecodeError as e:
    return None, f"JSONDecodeError: {e.msg.removesuffix(' at')} at char {e.pos}"  # some msgs end in "at"
  if not isinstance(rec, dict):
    return None, f"a JSON {type(rec).__name__}, not an object"
  if not isinstance(rec.get("step"), int) or isinstance(rec["step"], bool):
    return None, "no integer step"
  return rec, ""


def metrics_path(workdir_or_file: str) -> str:
  return os.path.join(workdir_or_file, METRICS_FILE) if os.path.isdir(workdir_or_file) else workdir_or_file


def scan(path: str) -> list[Line]:
  """Every line of the metrics file `path`, readable or not, in file order (split at b"\\n" only)."""
  with open(path, "rb") as f:
    return [Line(i, raw, *parse_line(raw)) for i, raw in enumerate(f, 1)]


def read_metrics(workdir_or_file: str) -> list[dict[str, Any]]:
  """The readable records of a run's metrics.jsonl, in file order; unreadable lines are skipped.

  Skipped lines get one MetricsWarning per call naming their count and the first line number, except
  a torn last line, which is skipped silently (a killed run, or a live one mid-write).
  """
  path = metrics_path(workdir_or_file)
  lines = scan(path)
  bad = [ln for ln in lines if ln.record is None and not ln.torn]
  if bad:
    warnings.warn(f"{path}: {len(bad)} unreadable line(s) skipped, the first at line {bad[0].number} "
                  f"({bad[0].reason})", MetricsWarning, stacklevel=2)
  return [ln.record for ln in lines if ln.record is not None]


def set_aside(side_path: str, lines: list[Line]) -> None:
  """Appends `lines` to the side file as JSON objects, one a line, written atomically:

    {"line": 57, "text": "{\\"step\\": 5, \\"tra", "reason": "JSONDecodeError: ..."}

  `line` is the 1-based number in the metrics file as it was when set aside, `text` the raw line
  without its newline (invalid UTF-8 bytes as surrogate escapes: `text.encode("utf-8",
  "surrogateescape")` gives the bytes back), `reason` what `parse_line` said.
  """
  old = b""
  if os.path.exists(side_path):
    with open(side_path, "rb") as f:
      old = f.read()
  if old and not old.endswith(b"\n"):
    old += b"\n"
  new = "".join(json.dumps({"line": ln.number, "text": ln.raw.rstrip(b"\n").decode("utf-8", "surrogateescape"),
                            "reason": ln.reason}) + "\n" for ln in lines)
  files.atomic_write(side_path, old + new.encode("utf-8"))


def truncate_metrics(workdir: str, step: int | None) -> None:
  """Keeps the metrics.jsonl lines a resumed run will not write again; never deletes an unreadable one.

  Called on resume with the restored checkpoint's step, or None on a fresh start. Readable lines
  (`parse_line`) with step <= `step` stay, byte for byte and in order; the later ones -- all of
  them when `step` is None -- are dropped, since the run writes them again, identically.
  Unreadable lines are moved to WORKDIR/metrics.unreadable.jsonl (appended; format in `set_aside`),
  each reported in one stderr line naming file:line: `warning:` for a damaged line, a quieter
  `note:` for a torn last line (no newline: a process killed mid-write, the expected case). The side
  file is written before metrics.jsonl, each atomically, so a kill in between can repeat side
  entries but loses nothing. A second call changes nothing.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  lines = scan(path)
  bad = [ln for ln in lines if ln.record is None]
  keep = [ln.raw for ln in lines if ln.record is not None and step is not None and ln.record["step"] <= step]
  if bad:
    side = os.path.join(workdir, UNREADABLE_FILE)
    set_aside(side, bad)
    for ln in bad:
      what = "torn last line (killed mid-write?)" if ln.torn else "unreadable line"
      print(f"{'note' if ln.torn else 'warning'}: {path}:{ln.number}: {what} ({ln.reason}) moved to {side}",
            file=sys.stderr, flush=True)
  data = b"".join(raw if raw.endswith(b"\n") else raw + b"\n" for raw in keep)
  if data != b"".join(ln.raw for ln in lines):
    files.atomic_write(path, data)


def split_series(records: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
  steps, values = [], []
  for r in records:
    if key in r and isinstance(r[key], (int, float)):
      steps.append(r["step"])
      values.append(float(r[key]))
  return steps, values


class Progress:
  """`step 120/300 | loss 3.912 | 4.1k pos/s | ETA 0:43` on one console line (pos: batch x context positions)."""

  def __init__(self, total_steps: int, stream=sys.stdout):
    self.total, self.stream = total_steps, stream
    self.t0, self.s0 = time.time(), None

  def update(self, step: int, loss: float, positions_per_sec: float) -> None:
    if self.s0 is None:
      self.s0, self.t0 = step, time.time()
    done = step - self.s0
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    eta_s = "?" if not math.isfinite(eta) else f"{int(eta // 60)}:{int(eta % 60):02d}"
    self.stream.write(f"step {step}/{self.total} | loss {loss:.4f} | "
                      f"{positions_per_sec / 1e3:.1f}k pos/s | ETA {eta_s}\n")
    self.stream.flush()
