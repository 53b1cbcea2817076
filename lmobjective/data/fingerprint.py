"""Data fingerprints: what a checkpoint records of each source, so a resume never trains on changed data.

A fingerprint is cheap enough to take at every resume of a 100 GB source -- it never re-reads
the data: per file its size, its mtime and a SHA-256 of sampled blocks (a file up to
`WHOLE_BELOW` bytes is hashed whole; a larger one at `SAMPLES` evenly spaced blocks of `BLOCK`
bytes, first and last included); per tokenized split its token count and a hash of sampled ids
(what the cache holds). Built-in corpora are named by what they are derived from (the
interpreter for the stdlib corpora, the config for the Markov chain, which the config check
already compares).

`changes(saved, current)` compares two: a different size, sampled content or token stream is a
change of the data; an mtime alone (a copy, a `touch`) is reported but is not one.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

BLOCK = 1 << 16
SAMPLES = 32
WHOLE_BELOW = 1 << 24
ID_SAMPLES = 4096


def file_digest(path: str, size: int) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    if size <= WHOLE_BELOW:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    else:
      for offset in np.linspace(0, size - BLOCK, SAMPLES).astype(np.int64):
        f.seek(int(offset))
        h.update(f.read(BLOCK))
  return h.hexdigest()[:16]


def of_files(paths: list[str]) -> dict[str, Any]:
  """{'files', 'bytes', 'content', 'mtime_ns'} of a file source."""
  h, total, mtime = hashlib.sha256(), 0, 0
  for p in paths:
    st = os.stat(p)
    total, mtime = total + st.st_size, max(mtime, st.st_mtime_ns)
    h.update(f"{os.path.basename(p)}:{st.st_size}:{file_digest(p, st.st_size)};".encode())
  return {"files": len(paths), "bytes": total, "content": h.hexdigest()[:16], "mtime_ns": mtime}


def of_builtin(identity: str) -> dict[str, Any]:
  return {"content": hashlib.sha256(identity.encode()).hexdigest()[:16], "identity": identity}


def of_ids(ids: np.ndarray) -> dict[str, Any]:
  """Token count and a hash of `ID_SAMPLES` evenly spaced ids (all of them when fewer)."""
  sample = ids[np.linspace(0, len(ids) - 1, min(ID_SAMPLES, len(ids))).astype(np.int64)] if len(ids) else ids
  return {"tokens": int(len(ids)), "ids": hashlib.sha256(np.asarray(sample, np.int64).tobytes()).hexdigest()[:16]}


_CONTENT = ("files", "bytes", "content", "identity", "train", "val")


def changes(saved: dict[str, dict], current: dict[str, dict]) -> tuple[dict[str, str], dict[str, str]]:
  """({source: what changed in its data}, {source: what changed that is not data (mtime)})."""
  data, other = {}, {}
  for name in sorted(set(saved) | set(current)):
    a, b = saved.get(name), current.get(name)
    if a is None or b is None:
      data[name] = "added" if a is None else "removed"
      continue
    diffs = [_describe(k, a.get(k), b.get(k)) for k in _CONTENT if a.get(k) != b.get(k)]
    if diffs:
      data[name] = ", ".join(diffs)
    elif a.get("mtime_ns") != b.get("mtime_ns"):
      other[name] = "modified time changed, sampled content identical"
  return data, other


def _describe(key: str, a, b) -> str:
  if key in ("train", "val") and isinstance(a, dict) and isinstance(b, dict):
    if a.get("tokens") != b.get("tokens"):
      return f"{key} split {a.get('tokens')} -> {b.get('tokens')} tokens"
    return f"{key} split token ids differ"
  if key in ("files", "bytes"):
    return f"{key} {a} -> {b}"
  return f"{key} differs"
