"""Run outputs: metrics.jsonl (one JSON object per line), TensorBoard scalars, a console progress line.

Only the lead process (index 0) writes. Lines are appended and flushed as they come, so a killed
run keeps every line it printed; `read_metrics` skips a torn last line.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Iterable

from lmobjective import faults

METRICS_FILE = "metrics.jsonl"


def _jsonable(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf; keep them visible as strings
  return v


class MetricsWriter:
  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
               purge_step: int | None = None):
    """purge_step: TensorBoard drops the events of earlier files at steps >= it (a resumed run
    passes its checkpoint step + 1, a fresh one 0), as `checkpoint.truncate_metrics` does here."""
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10, purge_step=purge_step,
                                 filename_suffix=f".{os.getpid()}")  # a quick restart gets its own file

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
    """Everything written so far on disk, TensorBoard included (it buffers for `flush_secs`)."""
    if self.enabled and self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def read_metrics(workdir_or_file: str) -> list[dict[str, Any]]:
  path = workdir_or_file
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        break  # a torn final line from a killed process
  return records


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
