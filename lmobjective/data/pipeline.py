"""The training/eval data pipeline: sources → tokens (cached) → packed rows → mixed, sharded batches.

A batch is a dict of numpy arrays with B rows and T = context_length columns:
inputs, targets (int32; targets = inputs shifted by one, done here once), loss_mask (bool),
segment_ids (int32, 1-based per document, 0 = pad), positions (int32), source_ids (int32,
index into `source_names`, -1 where the target is padding).
Global batch k holds global rows [k*n*B, (k+1)*n*B); process p builds rows [p*B, (p+1)*B) of it.
Everything is a pure function of (seed, k), so grain's iterator state is just the next k.
Preference sources (`sources.PAIR_KINDS`) deal pairs instead of rows: B counts pairs (TRL's convention)
and a batch has `rows_per_example` = 2 rows per pair, interleaved (2i chosen, 2i+1 rejected). Pairs whose
two rows are identical after truncation (tied: no preference) are counted: a source of only those is
refused, some of them are warned about once.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import grain
import numpy as np

from lmobjective import config as config_lib
from lmobjective import files
from lmobjective.batch import MARGIN, MODEL_FIELDS, REFERENCE_LOGPS, field_dtype
from lmobjective.config import ConfigError
from lmobjective.data import cache, fingerprint, mixture, sources, streams, tokenized
from lmobjective.data.errors import DataWarning
from lmobjective.data.tokenizers import Tokenizer

FIELDS = MODEL_FIELDS  # what a batch carries for the model (plus source_ids, for accounting)
_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


class Pipeline:
  rows_per_example = 1  # rows a batch holds per example of train.batch_size

  def __init__(self, data_cfg, tok: Tokenizer, seed: int, batch_size: int, process_index: int = 0,
               process_count: int = 1, cache_dir: str | None = None):
    if not 0 <= process_index < process_count:
      raise ConfigError("process_index", process_index, f"must be in [0, process_count={process_count})")
    self.tok, self.seed, self.batch_size = tok, seed, batch_size
    self.process_index, self.process_count = process_index, process_count
    self.T, self.packing, self.masking = data_cfg.context_length, data_cfg.packing, data_cfg.document_masking
    self.source_names = tuple(data_cfg.sources.keys())
    self.weights = mixture.normalise({n: s.weight for n, s in data_cfg.sources.items()})
    self.stages = mixture.parse_stages(data_cfg.mixture_stages, self.source_names)  # [(step, weights)]
    directory = cache.directory(data_cfg, cache_dir)
    files.check_dir("data.cache_dir", directory)  # one line, not a traceback at the first cache write
    self.kinds = [data_cfg.sources[n].kind for n in self.source_names]
    self.rows_per_example = _rows_per_example(self.source_names, self.kinds)  # 2: pairs (chosen, rejected)
    self.sources = [tokenized.load(n, data_cfg.sources[n], tok, directory) for n in self.source_names]
    self.val_fractions = [data_cfg.sources[n].val_fraction for n in self.source_names]
    self.paths = [data_cfg.sources[n].path for n in self.source_names]
    self._source_cfgs = {n: data_cfg.sources[n] for n in self.source_names}
    self.train_rows = [self._rows(i, src.train, shuffle=True) for i, src in enumerate(self.sources)]
    for i, rows in enumerate(self.train_rows):
      if max([self.weights[i]] + [w[i] for _, w in self.stages]) > 0:
        self._check_trainable(i, rows, "train")
        if isinstance(rows, streams.PairRows):
          self._check_ties(i, rows)
    self.mixture = mixture.build(self.weights, self.stages, batch_size * process_count, seed)
    self._last_step = -1
    self._fingerprints = None
    self.reference_logps = None  # {source: {"train"|"val": float32 [pairs, 2]}} once `attach_reference`d

  def fingerprints(self) -> dict[str, dict]:
    """{source: its content fingerprint and its splits' token counts and sampled ids} (`fingerprint.py`)."""
    if self._fingerprints is None:
      self._fingerprints = {
          name: {**sources.content_fingerprint(name, self._source_cfgs[name]),
                 "train": fingerprint.of_ids(src.train.ids), "val": fingerprint.of_ids(src.val.ids)}
          for name, src in zip(self.source_names, self.sources)}
    return self._fingerprints

  def _check_trainable(self, i: int, rows, split: str) -> None:
    """A split that gives no row (no pair), or rows with no scored target, would train (or score) nothing."""
    name, pairs = self.source_names[i], isinstance(rows, streams.PairRows)
    size = (self.sources[i].train if split == "train" else self.sources[i].val).ids.size
    word = "training" if split == "train" else "validation"
    if rows.num_rows == 0:
      key, value = (("data.context_length", self.T) if split == "train" else
                    (f"data.sources.{name}.val_fraction", self.val_fractions[i]))
      raise ConfigError(key, value, f"source '{name}' has no {word} pairs" if pairs else
                        f"source '{name}' has {size} {word} tokens, too few for one row of "
                        f"context_length+1={self.T + 1}")
    if isinstance(rows, (streams.PaddedRows, streams.PairRows)) and rows.scored_targets() == 0:
      why = ("no scored response token (every response cut off by context_length and max_prompt_length)"
             if pairs else "no scored target token (no assistant turn with only_train_on_assistant, or every "
             "one cut off by context_length)")
      raise ConfigError(f"data.sources.{name}.path", self.paths[i], f"the {split} split of source '{name}' has "
                        f"{why}: it would {'train on' if split == 'train' else 'score'} nothing")

  def _check_ties(self, i: int, rows: streams.PairRows) -> None:
    """Pairs whose two rows are identical after truncation carry no preference: a source of only those
    is refused, some of them are counted in one warning."""
    name, tied = self.source_names[i], rows.tied_pairs()
    if not tied:
      return
    scfg = self._source_cfgs[name]
    cut = f"data.context_length={self.T}" + "".join(
        f", data.sources.{name}.{k}={getattr(scfg, k)}" for k in ("max_prompt_length", "max_response_length")
        if getattr(scfg, k) is not None)
    what = (f"identical chosen and rejected rows after truncation to {cut} (responses written identical, or "
            "differing only past the cut)")
    if tied == rows.num_rows:
      raise ConfigError(f"data.sources.{name}.path", self.paths[i], f"all {tied} pairs of the train split have "
                        f"{what}: there is no preference to learn")
    warnings.warn(f"data.sources.{name}: {tied} of {rows.num_rows} train pairs have {what}: they carry no "
                  "preference", DataWarning, stacklevel=2)

  def _rows(self, i: int, split, shuffle: bool):
    key = streams.source_key(self.source_names[i])
    if self.kinds[i] in sources.CHAT_KINDS:
      return streams.PaddedRows(split, self.T, self.tok.pad_id, self.masking, self.seed, key, shuffle)
    if self.kinds[i] in sources.PAIR_KINDS:
      scfg = self._source_cfgs[self.source_names[i]]
      return streams.PairRows(split, self.T, self.tok.pad_id, self.masking, self.seed, key, shuffle,
                              scfg.max_prompt_length, scfg.max_response_length)
    if self.packing == "window" and shuffle and split.ids.size > self.T + 1:
      return streams.WindowRows(split, self.T, self.tok.eos_id, self.masking, self.seed, key)
    return streams.ConcatRows(split, self.T, self.tok.eos_id, self.masking, self.seed, key, shuffle)

  # ---- training ---------------------------------------------------------------------------

  def global_rows(self, step: int) -> np.ndarray:
    """This process's global row indices of batch `step` (pair indices for preference sources)."""
    first = (step * self.process_count + self.process_index) * self.batch_size
    return np.arange(first, first + self.batch_size, dtype=np.int64)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    src_B, ctr_B = self.mixture.assign(self.global_rows(step))
    self._last_step = max(self._last_step, step)
    return self._assemble(src_B, ctr_B, self.train_rows, "train")

  def _assemble(self, src_B, ctr_B, row_sources, split: str) -> dict[str, np.ndarray]:
    """B examples -> B * rows_per_example rows (a pair's rows stay adjacent, in the order `fields` gives)."""
    k, T = self.rows_per_example, self.T
    out = {f: np.zeros((len(src_B) * k, T), field_dtype(f)) for f in FIELDS}
    out["source_ids"] = np.full((len(src_B) * k, T), -1, np.int32)
    if self.reference_logps is not None:
      out[REFERENCE_LOGPS] = np.zeros(len(src_B) * k, np.float32)
    if k == 2:
      out[MARGIN] = np.zeros(len(src_B) * k, np.float32)
    for s in np.unique(src_B):
      sel_B = np.flatnonzero(src_B == s)
      rows = (sel_B[:, None] * k + np.arange(k)[None, :]).ravel()
      f = row_sources[s].fields(ctr_B[sel_B])
      for name in FIELDS:
        out[name][rows] = f[name]
      counted = f["loss_mask"] if k == 2 else f["target_valid"]  # pairs: the source on response targets only
      out["source_ids"][rows] = np.where(counted, s, -1)
      if k == 2:
        out[MARGIN][rows] = f[MARGIN]
      if self.reference_logps is not None:  # column 0 the chosen row (even), 1 the rejected (odd)
        table_Nx2 = self.reference_logps[self.source_names[s]][split]
        out[REFERENCE_LOGPS][rows] = table_Nx2[f["pair_index"], np.arange(len(rows)) % 2]
    return out

  def attach_reference(self, tables: dict[str, dict[str, np.ndarray]]) -> None:
    """From now on batches carry REFERENCE_LOGPS, row 2i (2i+1) of a batch from `tables[source][split]
    [pair, 0 (1)]`: the reference's log-probs of each pair of each split (`run/reference_cache.py`)."""
    self.reference_logps = tables

  def pair_rows(self, name: str, split: str) -> streams.PairRows:
    """A pair source's `split` ("train" or "val") in split order: `pair_index` i = documents 2i, 2i+1."""
    s = self.source_index(name)
    return self._rows(s, getattr(self.sources[s], split), shuffle=False)

  def train_iterator(self) -> grain.DatasetIterator:
    """Infinite; grain state {'next_index': step} is JSON-serialisable (get_state/set_state)."""
    ds = grain.MapDataset.range(sys.maxsize).map(self.batch)
    return iter(ds.to_iter_dataset(_READ))

  # ---- evaluation -------------------------------------------------------------------------

  def source_index(self, name: str) -> int:
    if name not in self.source_names:
      raise ConfigError("eval source", name, f"unknown source; must be one of {', '.join(self.source_names)}")
    return self.source_names.index(name)

  def eval_batches(self, source_name: str, num_batches: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Deterministic rows of that source's validation split, in order (this process's share; wraps
    around). `batch_size` counts examples: each batch has batch_size * rows_per_example rows. Pairs
    do not wrap: each held-out pair is scored once and the slots past the split are padding pairs."""
    s = self.source_index(source_name)
    rows = self._rows(s, self.sources[s].val, shuffle=False)
    self._check_trainable(s, rows, "val")
    needed, pairs = num_batches * batch_size * self.process_count, self.rows_per_example == 2
    if needed > rows.num_rows:
      warnings.warn(f"data.sources.{source_name}: eval asks for {needed} {'pairs' if pairs else 'rows'}, the "
                    f"validation split has {rows.num_rows}; "
                    f"{'the rest are padding pairs (each held-out pair is scored once)' if pairs else 'rows repeat'}",
                    DataWarning, stacklevel=2)
    out = []
    for b in range(num_batches):
      first = (b * self.process_count + self.process_index) * batch_size
      ctr = np.arange(first, first + batch_size, dtype=np.int64)
      batch = self._assemble(np.full(batch_size, s), ctr, {s: rows}, "val")
      if pairs:  # a pair past the split is padding: no scored token, so no pair (`preference.pair_valid`)
        past_R = np.repeat(ctr >= rows.num_rows, 2)
        batch["loss_mask"][past_R] = False
        batch["source_ids"][past_R] = -1
        batch[MARGIN][past_R] = 0.0
        if REFERENCE_LOGPS in batch:
          batch[REFERENCE_LOGPS][past_R] = 0.0
      out.append(batch)
    return out

  # ---- accounting -------------------------------------------------------------------------

  def stats(self, step: int | None = None) -> dict[str, Any]:
    """Per-source sizes and accounting; realised shares and epochs after `step` batches (default: produced so far)."""
    steps = self._last_step + 1 if step is None else step
    total_rows = steps * self.batch_size * self.process_count
    rows_S = self.mixture.rows_per_source(total_rows)
    out = {"steps": steps, "global_rows": total_rows * self.rows_per_example,
           "tokens": total_rows * self.rows_per_example * self.T, "sources": {},
           "stages": [{"step": st, "weights": dict(zip(self.source_names, w.tolist()))} for st, w in self.stages]}
    for i, (name, src, rows) in enumerate(zip(self.source_names, self.sources, self.train_rows)):
      d = {"kind": self.kinds[i], "weight": float(self.weights[i]),
           "realised_share": float(rows_S[i] / max(total_rows, 1)),
           "train_documents": src.train.num_documents, "val_documents": src.val.num_documents,
           "train_tokens": int(src.train.ids.size), "val_tokens": int(src.val.ids.size),
           "rows_per_epoch": rows.num_rows, "remainder_fraction": rows.remainder_fraction(),
           "val_rows": self._rows(i, src.val, shuffle=False).num_rows if src.val.ids.size else 0,
           "epochs_seen": float(rows_S[i] / max(rows.num_rows, 1)), **src.info}
      if isinstance(rows, (streams.PaddedRows, streams.PairRows)):
        d.update(rows.accounting)
      out["sources"][name] = d
    return out


def _rows_per_example(names, kinds) -> int:
  """2 when the sources are preference pairs (all of them: a mixture cannot mix pairs and rows), else 1."""
  pairs = [k in sources.PAIR_KINDS for k in kinds]
  if any(pairs) and not all(pairs):
    name = names[pairs.index(False)]
    raise ConfigError(f"data.sources.{name}.kind", kinds[pairs.index(False)],
                      f"cannot be mixed with {' / '.join(sources.PAIR_KINDS)} sources (a batch holds pairs or rows, "
                      "not both)")
  return 2 if any(pairs) else 1


def build_pipeline(data_cfg, tok: Tokenizer, seed: int, batch_size: int, process_index: int = 0,
                   process_count: int = 1, cache_dir: str | None = None) -> Pipeline:
  """`data_cfg`: `config.data` (a ConfigDict or `config.DataConfig`; typed here, at the boundary)."""
  data_cfg = config_lib.section(config_lib.DataConfig, data_cfg, "data.")
  return Pipeline(data_cfg, tok, seed, batch_size, process_index, process_count, cache_dir)
