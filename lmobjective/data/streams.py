"""Row sources: a source's n-th training row as a pure function of (seed, source, n).

counter n → epoch = n // rows_per_epoch, and the row within it comes from a fresh seeded
permutation for that epoch, so a small source repeats with a new order (epochs are reported).
`window` draws random offsets instead (nanoGPT); an epoch there is rows_per_epoch draws.
Letters: R rows asked for, T context length, C = T + 1.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

from lmobjective.batch import MARGIN
from lmobjective.data import packing
from lmobjective.data.tokenized import Split


def source_key(name: str) -> int:
  """Seeds per source come from its name, so adding a source never reshuffles the others."""
  return zlib.crc32(name.encode())


class _EpochOrder:

  def __init__(self, num_rows: int, seed: int, key: int):
    self.num_rows, self.seed, self.key = num_rows, seed, key
    self._perm = functools.lru_cache(maxsize=4)(self._make_perm)

  def _make_perm(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, self.key, epoch]).permutation(self.num_rows)

  def rows(self, counters_R: np.ndarray) -> np.ndarray:
    epoch_R, within_R = np.divmod(counters_R, self.num_rows)
    out = np.empty(len(counters_R), np.int64)
    for e in np.unique(epoch_R):
      sel = epoch_R == e
      out[sel] = self._perm(int(e))[within_R[sel]]
    return out


class ConcatRows:
  """`concat` packing: row r = stream[r*T : r*T+T+1]; rows shuffled per epoch."""

  def __init__(self, split: Split, T: int, eos_id: int, document_masking: bool, seed: int, key: int,
               shuffle: bool = True):
    self.stream, self.T, self.eos_id, self.masking = split.ids, T, eos_id, document_masking
    self.num_rows = packing.num_concat_rows(len(self.stream), T)
    self._order = _EpochOrder(self.num_rows, seed, key) if shuffle and self.num_rows else None

  def remainder_fraction(self) -> float:
    """Share of the stream's tokens never used as a target (the tail that does not fill a row)."""
    return float((len(self.stream) - 1 - self.num_rows * self.T) / max(len(self.stream), 1))

  def fields(self, counters_R: np.ndarray) -> dict[str, np.ndarray]:
    rows = self._order.rows(counters_R) if self._order else counters_R % self.num_rows
    return packing.lm_fields(packing.concat_rows(self.stream, rows, self.T), self.eos_id, self.masking)


class WindowRows:
  """`window` packing: rows start at hashed random offsets, a pure function of (seed, source, counter)."""

  def __init__(self, split: Split, T: int, eos_id: int, document_masking: bool, seed: int, key: int):
    self.stream, self.T, self.eos_id, self.masking = split.ids, T, eos_id, document_masking
    self.seed, self.key = seed, key
    self.num_rows = packing.num_concat_rows(len(self.stream), T)

  def remainder_fraction(self) -> float:
    return 0.0

  def fields(self, counters_R: np.ndarray) -> dict[str, np.ndarray]:
    starts = packing.window_starts(self.seed, self.key, counters_R, len(self.stream), self.T)
    return packing.lm_fields(packing.window_rows(self.stream, starts, self.T), self.eos_id, self.masking)


class PaddedRows:
  """Chat SFT: conversations first-fit into padded rows once; rows shuffled per epoch."""

  def __init__(self, split: Split, T: int, pad_id: int, document_masking: bool, seed: int, key: int,
               shuffle: bool = True):
    self.tokens, self.seg, self.flags, self.accounting = packing.pack_padded(
        split.ids, split.lengths, split.flags, T + 1, pad_id)
    self.masking, self.num_rows = document_masking, self.tokens.shape[0]
    self._order = _EpochOrder(self.num_rows, seed, key) if shuffle and self.num_rows else None

  def remainder_fraction(self) -> float:
    return 0.0

  def scored_targets(self) -> int:
    """Targets with a loss over all rows (what `fields` sets in loss_mask), computed once."""
    seg_in, seg_tgt = self.seg[:, :-1], self.seg[:, 1:]
    return int((self.flags[:, 1:] & (seg_tgt > 0) & (seg_tgt == seg_in)).sum())

  def fields(self, counters_R: np.ndarray) -> dict[str, np.ndarray]:
    rows = self._order.rows(counters_R) if self._order else counters_R % self.num_rows
    return packing.padded_fields(self.tokens[rows], self.seg[rows], self.flags[rows], self.masking)


class PairRows:
  """Preference pairs: two padded rows per pair, interleaved (row 2i chosen, 2i+1 rejected); pairs shuffled
  per epoch. A counter counts pairs (`num_rows` is the number of pairs), so `fields(ctr_P)` gives 2P rows.

  Truncation, per row of C = T + 1 tokens (`packing.pair_spans`): the prompt keeps its end, its last
  min(P, max_prompt_length) tokens (None: T // 2); the response keeps its start, its first
  min(R, max_response_length, C - kept prompt) tokens (None: as many as fit). Both rows of a pair
  share the truncated prompt. Cut pairs are counted in `accounting`. `fields` also gives `pair_index`
  [2P]: which pair of the split each row is (after the epoch's permutation), for per-pair tables, and
  `margin` [2P]: the pair's margin on both rows (0 when the data gives none).
  """

  def __init__(self, split: Split, T: int, pad_id: int, document_masking: bool, seed: int, key: int,
               shuffle: bool = True, max_prompt_length: int | None = None, max_response_length: int | None = None):
    self.ids, self.flags, self.T, self.pad_id, self.masking = split.ids, split.flags, T, pad_id, document_masking
    self.margins = split.margins
    self.spans, self.accounting = packing.pair_spans(split.doc_starts, split.flags, T, max_prompt_length,
                                                     max_response_length)
    self.num_rows = split.num_documents // 2
    self._order = _EpochOrder(self.num_rows, seed, key) if shuffle and self.num_rows else None

  def remainder_fraction(self) -> float:
    return 0.0

  def scored_targets(self) -> int:
    """Targets with a loss over all rows: kept response flags, less a flag in column 0 (never a target)."""
    ps, p, rs, r = self.spans.T
    cum = np.concatenate([[0], np.cumsum(self.flags)])
    first_is_input = (p == 0) & (r > 0) & self.flags[np.minimum(rs, len(self.flags) - 1)]
    return int((cum[rs + r] - cum[rs] - first_is_input).sum())

  def fields(self, ctr_P: np.ndarray) -> dict[str, np.ndarray]:
    return self._pair_fields(self._order.rows(ctr_P) if self._order else ctr_P % self.num_rows)

  def _pair_fields(self, pairs_P: np.ndarray) -> dict[str, np.ndarray]:
    docs_R = (2 * pairs_P[:, None] + np.arange(2)[None, :]).ravel()
    tokens, seg, flags = packing.pair_rows(self.ids, self.flags, self.spans[docs_R], self.T + 1, self.pad_id)
    margin_R = self.margins[docs_R] if self.margins is not None else np.zeros(len(docs_R), np.float32)
    return {**packing.padded_fields(tokens, seg, flags, self.masking), "pair_index": docs_R // 2, MARGIN: margin_R}

  def tied_pairs(self, chunk: int = 4096) -> int:
    """Pairs whose chosen and rejected rows are identical as training reads them (inputs, targets and
    loss_mask after truncation): written identical, or differing only past the cut. No preference."""
    tied = 0
    for first in range(0, self.num_rows, chunk):
      f = self._pair_fields(np.arange(first, min(first + chunk, self.num_rows)))
      same_P = np.logical_and.reduce([(f[k][0::2] == f[k][1::2]).all(axis=1)
                                      for k in ("inputs", "targets", "loss_mask")])
      tied += int(same_P.sum())
    return tied
