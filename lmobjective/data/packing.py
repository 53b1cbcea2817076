"""Packing: token streams → rows of T+1 tokens → batch fields. Vectorised numpy, no per-token Python.

Letters: R rows, T = context length, C = T + 1 tokens per packed row, D documents.
Teacher forcing happens here, once: inputs = row[:, :-1], targets = row[:, 1:].

Document convention (concat/window): each document is followed by EOS in the stream. EOS is
the last *target* of its document and the first *input* of the next one (it doubles as BOS),
so with document masking a document's first token is predicted from EOS alone and nothing
of the previous document is visible. A row that starts mid-document starts segment 1 at
position 0.
"""

from __future__ import annotations

import numpy as np


def append_eos(ids: np.ndarray, lengths_D: np.ndarray, eos_id: int,
               opener_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(stream with EOS after every document, doc start offsets [D+1]). With `opener_id` (a tokenizer whose
  documents open with BOS: Llama's), every document also opens with it: [BOS doc EOS BOS doc EOS ...]."""
  if opener_id is not None:
    starts_D = np.concatenate([[0], np.cumsum(lengths_D)[:-1]]).astype(np.int64)
    ids = np.insert(np.asarray(ids), starts_D, opener_id)
    lengths_D = lengths_D + 1
  ends_D = np.cumsum(lengths_D + 1)
  stream = np.empty(int(ends_D[-1]) if len(ends_D) else 0, np.int64)
  is_eos = np.zeros(len(stream), bool)
  is_eos[ends_D - 1] = True
  stream[is_eos] = eos_id
  stream[~is_eos] = ids
  return stream, np.concatenate([[0], ends_D])


def num_concat_rows(stream_len: int, T: int) -> int:
  """Rows r cover stream[r*T : r*T+T+1]: consecutive rows share one token, each other token is a target once."""
  return max(stream_len - 1, 0) // T


def concat_rows(stream: np.ndarray, rows_R: np.ndarray, T: int) -> np.ndarray:
  return stream[rows_R[:, None] * T + np.arange(T + 1)[None, :]]


def _splitmix64(x: np.ndarray) -> np.ndarray:
  x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def hash_ints(seed: int, key: int, counters_R: np.ndarray) -> np.ndarray:
  """A pure, vectorised hash of (seed, key, counter) → uint64."""
  with np.errstate(over="ignore"):
    h = _splitmix64(np.full(1, seed, np.uint64) * np.uint64(0x100000001B3) + np.uint64(key))
    return _splitmix64(counters_R.astype(np.uint64) ^ h)


def window_starts(seed: int, key: int, counters_R: np.ndarray, stream_len: int, T: int) -> np.ndarray:
  """nanoGPT-style random offsets in [0, stream_len - T - 1], a pure function of (seed, key, counter)."""
  return (hash_ints(seed, key, counters_R) % np.uint64(stream_len - T)).astype(np.int64)


def window_rows(stream: np.ndarray, starts_R: np.ndarray, T: int) -> np.ndarray:
  return stream[starts_R[:, None] + np.arange(T + 1)[None, :]]


def _positions(starts_RxT: np.ndarray) -> np.ndarray:
  """Position within the segment, given True at each segment's first input."""
  T = starts_RxT.shape[1]
  idx = np.where(starts_RxT, np.arange(T)[None, :], 0)
  return (np.arange(T)[None, :] - np.maximum.accumulate(idx, axis=1)).astype(np.int32)


def lm_fields(tokens_RxC: np.ndarray, eos_id: int, document_masking: bool) -> dict[str, np.ndarray]:
  """Fields of unpadded pretraining rows; segments come from EOS boundaries."""
  inputs = tokens_RxC[:, :-1].astype(np.int32)
  R, T = inputs.shape
  if document_masking:
    is_eos = inputs == eos_id
    seg = (np.cumsum(is_eos, axis=1) + 1 - is_eos[:, :1]).astype(np.int32)
    starts = is_eos.copy()
    starts[:, 0] = True
    pos = _positions(starts)
  else:
    seg = np.ones((R, T), np.int32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (R, T)).copy()
  return {"inputs": inputs, "targets": tokens_RxC[:, 1:].astype(np.int32),
          "loss_mask": np.ones((R, T), bool), "segment_ids": seg, "positions": pos,
          "target_valid": np.ones((R, T), bool)}


def padded_fields(tokens_RxC: np.ndarray, seg_RxC: np.ndarray, flags_RxC: np.ndarray,
                  document_masking: bool) -> dict[str, np.ndarray]:
  """Fields of padded rows (chat SFT). flags[j]: token j counts as a target. seg 0 = padding."""
  seg_in, seg_tgt = seg_RxC[:, :-1], seg_RxC[:, 1:]
  R, T = seg_in.shape
  target_valid = (seg_tgt > 0) & (seg_tgt == seg_in)
  if document_masking:
    starts = np.concatenate([np.ones((R, 1), bool), seg_in[:, 1:] != seg_in[:, :-1]], axis=1)
    seg, pos = seg_in.astype(np.int32), np.where(seg_in > 0, _positions(starts), 0).astype(np.int32)
  else:
    seg = (seg_in > 0).astype(np.int32)
    pos = np.where(seg_in > 0, np.arange(T, dtype=np.int32)[None, :], 0).astype(np.int32)
  return {"inputs": tokens_RxC[:, :-1].astype(np.int32), "targets": tokens_RxC[:, 1:].astype(np.int32),
          "loss_mask": flags_RxC[:, 1:].astype(bool) & target_valid, "segment_ids": seg, "positions": pos,
          "target_valid": seg_tgt > 0}


def first_fit(lengths_D: np.ndarray, capacity: int) -> np.ndarray:
  """Bin index of each item (in order) under first-fit; items must be <= capacity. Loop over items, not tokens."""
  free = np.zeros(0, np.int64)
  bins = np.empty(len(lengths_D), np.int64)
  for i, n in enumerate(lengths_D):
    fits = np.flatnonzero(free >= n)
    if fits.size:
      bins[i] = fits[0]
      free[fits[0]] -= n
    else:
      bins[i] = len(free)
      free = np.append(free, capacity - n)
  return bins


def pack_padded(ids: np.ndarray, lengths_D: np.ndarray, flags: np.ndarray, capacity: int,
                pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
  """First-fit documents into rows of `capacity` tokens, padding the rest. Longer documents are cut.

  Returns tokens, segment ids (1-based per row, 0 = pad), flags, and accounting.
  """
  starts_D = np.concatenate([[0], np.cumsum(lengths_D)[:-1]]).astype(np.int64)
  kept_D = np.minimum(lengths_D, capacity)
  bins_D = first_fit(kept_D, capacity)
  R = int(bins_D.max()) + 1 if len(bins_D) else 0
  order = np.argsort(bins_D, kind="stable")
  col_start_D = np.empty(len(lengths_D), np.int64)
  cum = np.cumsum(kept_D[order])
  first_in_bin = np.concatenate([[True], bins_D[order][1:] != bins_D[order][:-1]])
  group_base = np.maximum.accumulate(np.where(first_in_bin, cum - kept_D[order], 0))
  col_start_D[order] = cum - kept_D[order] - group_base
  seg_D = np.empty(len(lengths_D), np.int64)
  seg_D[order] = np.arange(len(order)) - np.maximum.accumulate(np.where(first_in_bin, np.arange(len(order)), 0)) + 1
  doc = np.repeat(np.arange(len(lengths_D)), kept_D)
  within = np.arange(len(doc)) - np.repeat(np.cumsum(kept_D) - kept_D, kept_D)
  rows, cols, src = bins_D[doc], col_start_D[doc] + within, starts_D[doc] + within
  tokens = np.full((R, capacity), pad_id, np.int64)
  seg = np.zeros((R, capacity), np.int32)
  out_flags = np.zeros((R, capacity), bool)
  tokens[rows, cols], seg[rows, cols], out_flags[rows, cols] = ids[src], seg_D[doc], flags[src]
  acct = {"rows": R, "padding_fraction": float(1 - kept_D.sum() / max(R * capacity, 1)),
          "truncated_documents": int((lengths_D > capacity).sum()),
          "truncated_tokens": int((lengths_D - kept_D).sum())}
  return tokens, seg, out_flags, acct


# ---- preference pairs: two padded rows per pair (2i chosen, 2i+1 rejected) -----------------


def pair_spans(starts_D: np.ndarray, flags: np.ndarray, T: int, max_prompt: int | None,
               max_response: int | None) -> tuple[np.ndarray, dict]:
  """Kept spans of pair documents [D, 4] (prompt start, prompt length, response start, response length).

  A document's prompt is every token before its first flag, its response the rest. Within a row of
  C = T + 1 tokens the prompt keeps its last p = min(P, max_prompt) tokens (None: T // 2), the
  response its first min(R, max_response, C - p) (None: as many as fit). P is the same in both rows
  of a pair, so they share the truncated prompt.
  """
  begin_D, end_D = starts_D[:-1], starts_D[1:]
  at = np.flatnonzero(flags)
  doc = np.searchsorted(starts_D, at, side="right") - 1
  resp_D = end_D.copy()  # no flag: no response (cannot happen for rendered pairs)
  first_docs, first = np.unique(doc, return_index=True)
  resp_D[first_docs] = at[first]
  P_D, R_D = resp_D - begin_D, end_D - resp_D
  p_D = np.minimum(P_D, T // 2 if max_prompt is None else max_prompt)
  r_D = np.clip(np.minimum(R_D, T + 1 - p_D), 0, max_response)
  spans = np.stack([resp_D - p_D, p_D, resp_D, r_D], axis=1)
  cum = np.concatenate([[0], np.cumsum(flags)])
  lost = (cum[end_D] - cum[resp_D + r_D]).reshape(-1, 2).any(axis=1)  # a flagged (scored) token was cut
  acct = {"pairs": len(P_D) // 2, "rows": len(P_D),
          "padding_fraction": float(1 - (p_D + r_D).sum() / max(len(P_D) * (T + 1), 1)),
          "prompt_truncated_pairs": int((P_D[0::2] > p_D[0::2]).sum()),
          "response_truncated_pairs": int(lost.sum()),
          "truncated_tokens": int((P_D - p_D + R_D - r_D).sum())}
  return spans, acct


def pair_rows(ids: np.ndarray, flags: np.ndarray, spans_Rx4: np.ndarray, capacity: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens, segment ids: 1 on tokens, 0 on padding, flags) [R, capacity]: prompt span, response span, pad."""
  ps, p, rs, r = (spans_Rx4[:, k:k + 1] for k in range(4))
  col = np.arange(capacity)[None, :]
  src = np.where(col < p, ps + col, rs + col - p)
  used = col < p + r
  src = np.where(used, src, 0)
  tokens = np.where(used, ids[src], pad_id)
  return tokens, used.astype(np.int32), flags[src] & used
