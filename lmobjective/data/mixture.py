"""Weighted mixture: global row index → (source, that source's row counter), a pure function of the seed.

Rows are dealt in windows of W rows. Each window gets exact per-source quotas from a
largest-remainder allocation of the *cumulative* target (so after m windows source s has
had floor or ceil of m*W*p_s rows: the realised share never drifts), and the window's slots
are shuffled with a seeded permutation (random order, not round-robin). A source's row
counter is how many rows of it came before, so its epochs and shuffles follow (streams.py).
Every row has T positions, so row shares are token shares.
Letters: S sources, W rows per window, R rows asked for.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from lmobjective.config import ConfigError

_MIN_WINDOW = 1024
_CACHE = 4  # windows kept (a batch spans at most two)


def normalise(weights: dict[str, float]) -> np.ndarray:
  """Validated, normalised weights in the given order (one line naming the bad key)."""
  for name, w in weights.items():
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
      raise ConfigError(f"data.sources.{name}.weight", w, "must be a finite number >= 0")
  w = np.array(list(weights.values()), np.float64)
  if w.sum() <= 0:
    raise ConfigError("data.sources.*.weight", dict(weights), "at least one weight must be > 0")
  return w / w.sum()


class Mixture:

  def __init__(self, weights_S: np.ndarray, seed: int):
    self.p_S = np.asarray(weights_S, np.float64) / np.sum(weights_S)
    self.seed = seed
    pos = self.p_S[self.p_S > 0]
    self.window = max(_MIN_WINDOW, int(math.ceil(2.0 / pos.min())))  # every active quota >= 1 row
    self._window = functools.lru_cache(maxsize=_CACHE)(self._make_window)  # thread-safe memo

  def allocated(self, num_windows: int) -> np.ndarray:
    """Rows per source in the first `num_windows` windows: largest remainder of the cumulative target."""
    n = num_windows * self.window
    target = n * self.p_S
    alloc = np.floor(target).astype(np.int64)
    extra = n - int(alloc.sum())
    frac = np.where(self.p_S > 0, target - alloc, -1.0)
    alloc[np.argsort(-frac, kind="stable")[:extra]] += 1
    return alloc

  def _make_window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
    before, after = self.allocated(w), self.allocated(w + 1)
    quota_S = after - before
    src_W = np.repeat(np.arange(len(quota_S)), quota_S)
    src_W = src_W[np.random.default_rng([self.seed, 0x4D4958, w]).permutation(self.window)]
    order = np.argsort(src_W, kind="stable")
    rank = np.empty(self.window, np.int64)
    rank[order] = np.arange(self.window) - np.repeat(np.cumsum(quota_S) - quota_S, quota_S)
    return src_W, before[src_W] + rank

  def assign(self, rows_R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source index, that source's row counter) for each global row index."""
    src, ctr = np.empty(len(rows_R), np.int64), np.empty(len(rows_R), np.int64)
    w_R = rows_R // self.window
    for w in np.unique(w_R):
      sel = w_R == w
      s_W, c_W = self._window(int(w))
      src[sel], ctr[sel] = s_W[rows_R[sel] % self.window], c_W[rows_R[sel] % self.window]
    return src, ctr

  def rows_per_source(self, num_rows: int) -> np.ndarray:
    """How many of the first `num_rows` global rows each source got (exact)."""
    w, r = divmod(num_rows, self.window)
    counts = self.allocated(w)
    if r:
      counts = counts + np.bincount(self._window(w)[0][:r], minlength=len(self.p_S))
    return counts
