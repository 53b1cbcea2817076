"""Per-document scores: one row per document, the table mixture and data-quality studies start from.

    python -m lmobjective.evaluate --workdir=runs/default --source=prose --per_document=prose.jsonl
    python -m lmobjective.evaluate --hf=path/to/model --documents_file=docs.jsonl --per_document=out.jsonl

A row is {id, source, tokens, bytes, logprob, loss, bits_per_byte}: `logprob` the summed log p of every
token of the document (nats), `loss` = -logprob / tokens, `bits_per_byte` = -logprob / (ln 2 · UTF-8
bytes). Each token is scored exactly once (`loglikelihood.rolling_windows`: lm-evaluation-harness's
`loglikelihood_rolling`); the first token is predicted from the prefix token (the tokenizer's opener:
BOS where the model's tokenizer prepends it, else EOS). So the rows add up, token-weighted, to
`Run.perplexity` of the same texts.

`worst`, `by_source` and `by_length` are the recipes of docs/evaluation.md.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Sequence

import numpy as np

from lmobjective import files
from lmobjective.analysis import loglikelihood

FIELDS = ("id", "source", "tokens", "bytes", "logprob", "loss", "bits_per_byte")


def score_documents(run, documents: Iterable[tuple[str, str, str]], batch_size: int = 16) -> list[dict]:
  """A row per (id, source, text) of `documents`, in order; an empty text is refused (ValueError)."""
  documents = list(documents)
  requests, owner = [], []
  T, opener = run.context_length, run.tokenizer.opener_id
  for d, (doc_id, source, text) in enumerate(documents):
    if not text:
      raise ValueError(f"document {doc_id!r} of {source!r}: is empty (nothing to score)")
    windows = loglikelihood.rolling_windows(run.tokenizer.encode(text), opener, T)
    requests += windows
    owner += [d] * len(windows)
  scored = loglikelihood.score(run, requests, batch_size)
  logprob, tokens = np.zeros(len(documents)), np.zeros(len(documents), np.int64)
  for d, s in zip(owner, scored):
    logprob[d] += s.logprob
    tokens[d] += len(s.token_ids)
  rows = []
  for d, (doc_id, source, text) in enumerate(documents):
    nbytes = len(text.encode("utf-8"))
    rows.append({"id": doc_id, "source": source, "tokens": int(tokens[d]), "bytes": nbytes,
                 "logprob": float(logprob[d]), "loss": float(-logprob[d] / tokens[d]) if tokens[d] else None,
                 "bits_per_byte": float(-logprob[d] / math.log(2) / nbytes)})
  return rows


def read_documents(path: str) -> list[tuple[str, str, str]]:
  """(id, source, text) of each line of a JSONL file of {"text": ..., optional "id", optional "source"}
  (id defaults to the line number, source to the file's name); one-line errors naming the line."""
  out = []
  try:
    f = open(path, encoding="utf-8")
  except OSError as e:
    raise ValueError(f"--documents_file={path}: {(e.strerror or type(e).__name__).lower()}") from None
  with f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"--documents_file={path}:{n}"
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg})") from None
      if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise ValueError(f"{where}: needs a string 'text'")
      if not rec["text"]:
        raise ValueError(f"{where}: the document is empty (nothing to score)")
      out.append((str(rec.get("id", n)), str(rec.get("source", os.path.basename(path))), rec["text"]))
  if not out:
    raise ValueError(f"--documents_file={path}: has no documents")
  return out


def write_jsonl(rows: Sequence[dict], path: str) -> None:
  """The rows as JSONL, written atomically (a reader never sees half a table)."""
  files.atomic_write(path, "".join(json.dumps({k: r[k] for k in FIELDS}) + "\n" for r in rows))


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def totals(rows: Sequence[dict]) -> dict:
  """Token-weighted loss and byte-weighted bits per byte of `rows` (what `evaluate` prints for them)."""
  logprob = sum(r["logprob"] for r in rows)
  tokens, nbytes = sum(r["tokens"] for r in rows), sum(r["bytes"] for r in rows)
  return {"documents": len(rows), "tokens": tokens, "bytes": nbytes, "loss": -logprob / max(tokens, 1),
          "bits_per_byte": -logprob / math.log(2) / max(nbytes, 1)}


def worst(rows: Sequence[dict], fraction: float = 0.01, key: str = "bits_per_byte") -> list[dict]:
  """The `fraction` of rows (at least one) with the highest `key`, worst first."""
  n = max(1, int(round(fraction * len(rows))))
  return sorted(rows, key=lambda r: -r[key])[:n]


def by_source(rows: Sequence[dict]) -> dict[str, dict]:
  """`totals` per source."""
  names = sorted({r["source"] for r in rows})
  return {s: totals([r for r in rows if r["source"] == s]) for s in names}


def by_length(rows: Sequence[dict], edges: Sequence[int] = (64, 256, 1024, 4096)) -> list[dict]:
  """`totals` of the documents in each token-length bin [lo, hi) cut at `edges`."""
  bounds = [0, *edges, math.inf]
  out = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    part = [r for r in rows if lo <= r["tokens"] < hi]
    if part:
      out.append({"tokens_from": lo, "tokens_to": hi, **totals(part)})
  return out
