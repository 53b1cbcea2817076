"""Data-pipeline throughput on this machine (a script, not a test).

  python experiments/bench_data.py [--batch_size=32] [--seconds=5]

1. pre-tokenized: the default experiment's pipeline (cached tokens, concat packing, 3-source
   mixture) through grain's iterator, tokens/s of `inputs`.
2. on-the-fly: raw stdlib text → SentencePiece batch encode (both cores) → EOS → concat rows →
   batch fields, tokens/s of `inputs`, no cache involved.
"""

import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from lmobjective import data  # noqa: E402
from lmobjective.data import packing, sources  # noqa: E402

_BATCH = flags.DEFINE_integer("batch_size", 32, "rows per batch")
_SECONDS = flags.DEFINE_float("seconds", 5.0, "time per measurement")
_WORKDIR = flags.DEFINE_string("workdir", None, "run dir holding the tokenizer (default: a temp dir)")
_CACHE = flags.DEFINE_string("cache_dir", None, "token cache (default: data.cache_dir or ~/.cache/lmobjective)")


def bench_pretokenized(cfg, tok, B: int, seconds: float) -> float:
  pipe = data.build_pipeline(cfg.data, tok, seed=0, batch_size=B)
  it = pipe.train_iterator()
  for _ in range(20):  # warm up threads and caches
    next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    n += next(it)["inputs"].size
  return n / (time.perf_counter() - t0)


def bench_on_the_fly(cfg, tok, B: int, seconds: float) -> tuple[float, float]:
  docs = sources.load_source("code", cfg.data.sources.code).train
  T = cfg.data.context_length
  n, nbytes, i, t0 = 0, 0, 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    chunk = docs[i:i + 64] or docs[:64]
    i = (i + 64) % len(docs)
    ids, lengths = tok.encode_flat(chunk)
    stream, _ = packing.append_eos(ids, lengths, tok.eos_id)
    rows = np.arange(packing.num_concat_rows(len(stream), T))
    for r in range(0, len(rows) - B + 1, B):
      n += packing.lm_fields(packing.concat_rows(stream, rows[r:r + B], T), tok.eos_id, True)["inputs"].size
    nbytes += sum(len(d.encode()) for d in chunk)
  dt = time.perf_counter() - t0
  return n / dt, nbytes / dt


def main(argv):
  del argv
  cfg = default.get_config()
  if _CACHE.value:
    cfg.data.cache_dir = _CACHE.value
  workdir = _WORKDIR.value or tempfile.mkdtemp()
  t0 = time.perf_counter()
  tok = data.build_tokenizer(cfg.data, workdir)
  t1 = time.perf_counter()
  data.build_pipeline(cfg.data, tok, seed=0, batch_size=_BATCH.value)  # fills the cache if it is cold
  t2 = time.perf_counter()
  print(f"setup: tokenizer {t1 - t0:.1f}s, pipeline (tokenize+cache or load) {t2 - t1:.1f}s, "
        f"{os.cpu_count()} cores")
  pre = bench_pretokenized(cfg, tok, _BATCH.value, _SECONDS.value)
  print(f"pre-tokenized packed+mixed batches ({_BATCH.value}x{cfg.data.context_length}): {pre / 1e6:.2f} M tokens/s")
  fly, bps = bench_on_the_fly(cfg, tok, _BATCH.value, _SECONDS.value)
  print(f"on-the-fly SentencePiece ({tok.vocab_size} bpe) + packing: {fly / 1e6:.2f} M tokens/s "
        f"({bps / 1e6:.1f} MB/s of text)")


if __name__ == "__main__":
  app.run(main)
