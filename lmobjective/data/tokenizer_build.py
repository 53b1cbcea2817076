"""`build_tokenizer`: load the run's tokenizer, or train it on a seeded sample of the mixture and save it
(`prepare_tokenizer`: the same, with the save left to the caller, after its own checks).

The sample is a pure function of the config (seeded numpy, sources in name order), and
SentencePiece is told not to shuffle, so two processes train byte-identical tokenizers.
Only training splits are sampled: validation text never shapes the vocabulary.
"""

from __future__ import annotations

import functools
import os
import zlib
from typing import Callable

import numpy as np

from lmobjective import config as config_lib
from lmobjective import files
from lmobjective.config import ConfigError
from lmobjective.data import cache, sources, tokenizers
from lmobjective.data.tokenizers import Tokenizer

_MAX_LINE_CHARS = 256  # longer lines are cut into chunks (markov documents are single long lines)


def source_weights(data_cfg) -> dict[str, float]:
  return {name: float(s.weight) for name, s in data_cfg.sources.items()}


def _texts(doc) -> list[str]:
  """The text of a document: a string, a conversation's contents, or a pair's prompt and responses."""
  if isinstance(doc, dict):
    return _texts(doc["prompt"]) + [doc["chosen"], doc["rejected"]]
  return [m["content"] for m in doc] if isinstance(doc, list) else [doc]


def _lines(docs: list) -> list[str]:
  out = []
  for d in docs:
    for t in _texts(d):
      for line in t.split("\n"):
        out += [line[i:i + _MAX_LINE_CHARS] for i in range(0, len(line), _MAX_LINE_CHARS) if line[i:i + _MAX_LINE_CHARS].strip()]
  return out


def training_lines(data_cfg) -> list[str]:
  """~sample_lines lines drawn from the sources' train splits in proportion to their weights."""
  weights = source_weights(data_cfg)
  total = sum(weights.values())
  cache_dir = cache.directory(data_cfg)
  files.check_dir("data.cache_dir", cache_dir)  # the pipeline's one line, before the first cache write
  out = []
  for name, scfg in data_cfg.sources.items():
    if weights[name] <= 0:
      continue
    lines = _lines(sources.load_source(name, scfg, cache_dir).train)
    quota = int(round(data_cfg.tokenizer.sample_lines * weights[name] / total))
    if len(lines) > quota:
      rng = np.random.default_rng([data_cfg.tokenizer.seed, zlib.crc32(name.encode())])
      lines = [lines[i] for i in np.sort(rng.choice(len(lines), size=quota, replace=False))]
    out += lines
  return out


def train(data_cfg) -> Tokenizer:
  tcfg = data_cfg.tokenizer
  if tcfg.kind == "byte":
    return tokenizers.ByteTokenizer()
  lines = training_lines(data_cfg)
  if tcfg.kind == "char":
    return tokenizers.train_char(lines)
  return tokenizers.train_sentencepiece(lines, tcfg)


def build_tokenizer(data_cfg, workdir: str) -> Tokenizer:
  """The tokenizer saved in `workdir/tokenizer/` (resume), else `data.tokenizer.path`, else a trained one."""
  tok, save = prepare_tokenizer(data_cfg, workdir)
  save()
  return tok


def prepare_tokenizer(data_cfg, workdir: str) -> tuple[Tokenizer, Callable[[], None]]:
  """Like `build_tokenizer`, but a new tokenizer is not saved yet: call the returned `save()` once
  every check that uses it has passed, so a failed run leaves no tokenizer that refuses its rerun."""
  data_cfg = config_lib.section(config_lib.DataConfig, data_cfg, "data.")
  run_dir = os.path.join(workdir, "tokenizer")
  want = tokenizers.spec(data_cfg.tokenizer)
  if os.path.isdir(run_dir):
    tok, have = tokenizers.load(run_dir, key="workdir")
    for field, value in want.items():
      if data_cfg.tokenizer.path is None and have.get(field, value) != value:
        raise ConfigError(f"data.tokenizer.{field}", value,
                          f"the run's saved tokenizer ({run_dir}) has {field}={have.get(field)!r}; use a new workdir")
    return tok, lambda: None
  if data_cfg.tokenizer.path is not None:
    tok, _ = tokenizers.load(os.path.expanduser(data_cfg.tokenizer.path))
    if tok.kind != data_cfg.tokenizer.kind:
      raise ConfigError("data.tokenizer.kind", data_cfg.tokenizer.kind,
                        f"data.tokenizer.path={data_cfg.tokenizer.path!r} holds a {tok.kind} tokenizer")
  else:
    tok = train(data_cfg)
  spec = want if data_cfg.tokenizer.path is None else {"kind": tok.kind}
  return tok, functools.partial(tokenizers.save, tok, run_dir, spec)
