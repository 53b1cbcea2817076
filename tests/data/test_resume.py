"""Resume and multi-host: the data position is a pure function of (seed, step)."""

import json

import numpy as np
import pytest

from conftest import markov_config
from lmobjective import data
from lmobjective.data import tokenizers


def _build(cfg, cache_dir, B=8, p=0, n=1):
  return data.build_pipeline(cfg.data, tokenizers.ByteTokenizer(), seed=5, batch_size=B, process_index=p,
                             process_count=n, cache_dir=cache_dir)


def _equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("packing,masking", [("concat", True), ("window", False)])
def test_resume_from_state_gives_the_same_next_50_batches(cache_dir, packing, masking):
  cfg = markov_config((0.6, 0.3, 0.1), T=32, num_documents=30)  # small sources: several epochs in 57 batches
  cfg.data.packing, cfg.data.document_masking = packing, masking
  it = _build(cfg, cache_dir).train_iterator()
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as a checkpoint would store it
  expected = [next(it) for _ in range(50)]
  fresh = _build(cfg, cache_dir).train_iterator()  # a new pipeline from scratch
  fresh.set_state(state)
  for e in expected:
    _equal(next(fresh), e)
  assert state == {"next_index": 7}


def test_resume_does_not_replay_the_first_batches(cache_dir):
  cfg = markov_config((1.0,), T=32)
  it = _build(cfg, cache_dir).train_iterator()
  first = next(it)
  it.set_state({"next_index": 10})
  assert not np.array_equal(next(it)["inputs"], first["inputs"])


def test_processes_build_their_own_rows_of_the_global_batch(cache_dir):
  cfg = markov_config((0.5, 0.5), T=16)
  whole = _build(cfg, cache_dir, B=8, n=1)
  parts = [_build(cfg, cache_dir, B=4, p=p, n=2) for p in range(2)]
  for step in range(3):
    glob = whole.batch(step)
    for k in glob:
      np.testing.assert_array_equal(np.concatenate([parts[0].batch(step)[k], parts[1].batch(step)[k]]), glob[k])


def test_stats_are_json_serialisable(cache_dir):
  pipe = _build(markov_config((0.5, 0.5)), cache_dir)
  st = json.loads(json.dumps(pipe.stats(step=10)))
  assert st["tokens"] == 10 * 8 * 16 and set(st["sources"]) == {"m0", "m1"}
  m0 = st["sources"]["m0"]
  assert m0["train_documents"] == 190 and m0["val_documents"] == 10 and m0["train_tokens"] == 190 * 301
  assert m0["rows_per_epoch"] == (190 * 301 - 1) // 16 and 0 <= m0["remainder_fraction"] < 16 / (190 * 301)
  assert m0["entropy_rate_bits_per_byte"] > 0
