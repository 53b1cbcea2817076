"""A source's train/validation splits as token arrays (via the cache): what packing works from."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from lmobjective import config as config_lib
from lmobjective.data import cache, packing, sft, sources
from lmobjective.data.tokenizers import Tokenizer


@dataclasses.dataclass
class Split:
  """One split. ids: the stream (EOS after every document); doc_starts [D+1]; flags: SFT loss flags.

  Preference pairs are documents 2i (prompt+chosen) and 2i+1 (prompt+rejected), flags on the response;
  margins: float32 [D], each pair's `margin` on both its documents, when the data gives them.
  """
  ids: np.ndarray
  doc_starts: np.ndarray
  flags: np.ndarray | None = None
  margins: np.ndarray | None = None

  @property
  def num_documents(self) -> int:
    return len(self.doc_starts) - 1

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.doc_starts)


@dataclasses.dataclass
class TokenizedSource:
  name: str
  train: Split
  val: Split
  info: dict[str, Any]


def _tokenize_split(docs: list, scfg, tok: Tokenizer) -> Split:
  if scfg.kind in sources.CHAT_KINDS + sources.PAIR_KINDS:
    ids, lengths, flags = (sft.render(docs, tok, scfg.only_train_on_assistant) if scfg.kind in sources.CHAT_KINDS
                           else sft.render_pairs(docs, tok))
    margins = (np.repeat(np.array([d[sources.MARGIN] for d in docs], np.float32), 2)
               if docs and scfg.kind in sources.PAIR_KINDS and sources.MARGIN in docs[0] else None)
    return Split(ids, np.concatenate([[0], np.cumsum(lengths)]), flags, margins)
  ids, lengths = tok.encode_flat(docs)
  opener = None if tok.opener_id == tok.eos_id else tok.opener_id  # Llama's BOS; EOS already separates
  stream, starts = packing.append_eos(ids, lengths, tok.eos_id, opener)
  return Split(stream, starts)


def _typed(name: str, scfg) -> config_lib.SourceConfig:
  return config_lib.section(config_lib.SourceConfig, scfg, f"data.sources.{name}.")


def tokenize(name: str, scfg, tok: Tokenizer, cache_dir: str | None = None) -> TokenizedSource:
  scfg = _typed(name, scfg)
  docs = sources.load_source(name, scfg, cache_dir)
  out = TokenizedSource(name, _tokenize_split(docs.train, scfg, tok), _tokenize_split(docs.val, scfg, tok), docs.info)
  for split_name, split in (("train", out.train), ("val", out.val)):
    tok.check_ids(split.ids, f"data.sources.{name} ({split_name} split)")
  return out


def cache_key(name: str, scfg, tok: Tokenizer) -> str:
  """The token cache's key of a source: its config (but its weight), its content and the tokenizer."""
  fields = {k: v for k, v in dataclasses.asdict(_typed(name, scfg)).items() if k != "weight"}
  if not fields["exclude_modules"]:  # keyed only when set: caches from before the key stay valid
    del fields["exclude_modules"]
  return cache.key({"source": fields, "content": sources.fingerprint(name, scfg), "tokenizer": tok.fingerprint()})


def load(name: str, scfg, tok: Tokenizer, cache_dir: str | None) -> TokenizedSource:
  """Tokenized splits from the cache, tokenizing and caching them on a miss (cache_dir None = no cache)."""
  scfg = _typed(name, scfg)
  if cache_dir is None:
    return tokenize(name, scfg, tok)
  path = cache.path_for(cache_dir, name, cache_key(name, scfg, tok))
  hit = cache.load(path, tok.fingerprint())
  if hit is not None:
    arrays, meta = hit
    splits = {s: Split(arrays[f"{s}_ids"].astype(np.int64), arrays[f"{s}_starts"], arrays.get(f"{s}_flags"),
                       arrays.get(f"{s}_margins")) for s in ("train", "val")}
    for s, split in splits.items():
      tok.check_ids(split.ids, f"data.sources.{name} ({s} split, cache {path})")
    return TokenizedSource(name, splits["train"], splits["val"], meta["info"])
  src = tokenize(name, scfg, tok, cache_dir)
  arrays = {}
  for s, split in (("train", src.train), ("val", src.val)):
    arrays[f"{s}_ids"], arrays[f"{s}_starts"] = split.ids, split.doc_starts
    if split.flags is not None:
      arrays[f"{s}_flags"] = split.flags
    if split.margins is not None:
      arrays[f"{s}_margins"] = split.margins
  cache.save(path, arrays, {"tokenizer": tok.fingerprint(), "info": json.loads(json.dumps(src.info))},
             tok.vocab_size)
  return src
