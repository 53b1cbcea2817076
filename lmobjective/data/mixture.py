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

  def __init__(self, weights_S: np.ndarray, seed: int, stage: int = 0):
    self.p_S = np.asarray(weights_S, np.float64) / np.sum(weights_S)
    self.seed = seed
    self._key = [seed, 0x4D4958] + ([stage] if stage else [])  # stage 0: the key of a stage-less run
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
    src_W = src_W[np.random.default_rng(self._key + [w]).permutation(self.window)]
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


# ---- stages: the mixture changes at given steps ----------------------------------------------

STAGES_KEY = "data.mixture_stages"


def parse_stages(text: str | None, source_names: tuple[str, ...]) -> list[tuple[int, np.ndarray]]:
  """'STEP:name=w,name=w;STEP:...' -> [(step, normalised weights in source order)], steps increasing.

  Every source gets a weight in every stage (0 switches it off). Errors are one line naming the key.
  """
  stages = []
  for part in filter(None, (p.strip() for p in (text or "").split(";"))):
    step_text, colon, spec = part.partition(":")
    try:
      step = int(step_text)
      pairs = [kv.split("=") for kv in spec.split(",")]
      weights = {k.strip(): float(v) for k, v in pairs}
    except ValueError:
      raise ConfigError(STAGES_KEY, text, f"stage {part!r} is not STEP:name=weight,name=weight,...") from None
    if not colon or step <= 0 or (stages and step <= stages[-1][0]):
      raise ConfigError(STAGES_KEY, text, f"stage {part!r}: steps must be > 0 and increasing")
    if sorted(weights) != sorted(source_names) or len(pairs) != len(source_names):
      raise ConfigError(STAGES_KEY, text, f"stage {step} must give one weight to each of "
                        f"{', '.join(source_names)} (got {', '.join(k for k, _ in pairs)})")
    w = np.array([weights[n] for n in source_names])
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
      raise ConfigError(STAGES_KEY, text, f"stage {step}: weights must be finite, >= 0, not all 0")
    stages.append((step, w / w.sum()))
  return stages


def first_difference(weights_a: np.ndarray, stages_a: list, weights_b: np.ndarray, stages_b: list) -> int | None:
  """The first step at which two schedules deal different mixtures (None: they never differ)."""
  def at(weights, stages, step):
    return next((w for s, w in reversed(stages) if s <= step), weights), sum(s <= step for s, _ in stages)
  for step in sorted({0} | {s for s, _ in stages_a} | {s for s, _ in stages_b}):
    (wa, ka), (wb, kb) = at(weights_a, stages_a, step), at(weights_b, stages_b, step)
    if ka != kb or not np.array_equal(wa, wb):  # the stage number seeds the deal, so it counts too
      return step
  return None


class StagedMixture:
  """Mixtures in turn: stage k deals global rows [start_k, start_k+1) like a Mixture of its own
  (seeded by k), and each source's row counter carries on from where the earlier stages left it,
  so a switch replays and skips no row of any source. Rows before a switch are dealt exactly as
  in a run without it, which is why a stage may be added on resume at or after the checkpoint."""

  def __init__(self, weights_S: np.ndarray, stages: list[tuple[int, np.ndarray]], rows_per_step: int, seed: int):
    self.starts = np.array([0] + [step * rows_per_step for step, _ in stages], np.int64)
    self.parts = [Mixture(w, seed, stage=k) for k, w in enumerate([weights_S] + [w for _, w in stages])]
    self.p_S = self.parts[0].p_S
    self.base = [np.zeros(len(self.p_S), np.int64)]
    for k in range(1, len(self.parts)):
      self.base.append(self.base[-1] + self.parts[k - 1].rows_per_source(int(self.starts[k] - self.starts[k - 1])))

  def _stage(self, rows: np.ndarray) -> np.ndarray:
    return np.searchsorted(self.starts, rows, side="right") - 1

  def assign(self, rows_R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    src, ctr = np.empty(len(rows_R), np.int64), np.empty(len(rows_R), np.int64)
    k_R = self._stage(rows_R)
    for k in np.unique(k_R):
      sel = k_R == k
      src[sel], local = self.parts[k].assign(rows_R[sel] - self.starts[k])
      ctr[sel] = local + self.base[k][src[sel]]
    return src, ctr

  def rows_per_source(self, num_rows: int) -> np.ndarray:
    k = int(self._stage(np.array([num_rows]))[0])
    return self.base[k] + self.parts[k].rows_per_source(num_rows - int(self.starts[k]))


def build(weights_S: np.ndarray, stages: list[tuple[int, np.ndarray]], rows_per_step: int, seed: int):
  """A Mixture, or a StagedMixture when the mixture changes during training."""
  return StagedMixture(weights_S, stages, rows_per_step, seed) if stages else Mixture(weights_S, seed)

