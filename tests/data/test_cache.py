"""cache.py + tokenized.py: compact arrays, reuse without re-reading, foreign caches ignored."""

import glob
import os
import warnings

import numpy as np
import pytest

from conftest import markov_config
from lmobjective.data import DataError, DataWarning, cache, sources, tokenized, tokenizers


def _files(d):
  return sorted(glob.glob(os.path.join(d, "*")))


def test_cache_is_compact_atomic_and_reused(cache_dir, monkeypatch):
  scfg = markov_config().data.sources.m0
  tok = tokenizers.ByteTokenizer()
  first = tokenized.load("m0", scfg, tok, cache_dir)
  files = _files(cache_dir)
  assert len(files) == 1 and files[0].endswith(".npz")  # no temp files left behind
  with np.load(files[0]) as z:
    assert z["train_ids"].dtype == np.uint16 and z["train_ids"].size == first.train.ids.size
  monkeypatch.setattr(sources, "load_source", lambda *a: pytest.fail("re-read a cached source"))
  again = tokenized.load("m0", scfg, tok, cache_dir)
  np.testing.assert_array_equal(again.train.ids, first.train.ids)
  np.testing.assert_array_equal(again.val.doc_starts, first.val.doc_starts)
  assert again.info["entropy_rate_nats"] == first.info["entropy_rate_nats"]


def test_id_dtype():
  assert cache.id_dtype(65535) == np.uint16 and cache.id_dtype(65536) == np.uint32


def test_a_cache_written_by_another_tokenizer_is_ignored_with_one_warning(cache_dir):
  scfg = markov_config().data.sources.m0
  byte, char = tokenizers.ByteTokenizer(), tokenizers.CharTokenizer("!\"#$%&'()*+,-./0")
  tokenized.load("m0", scfg, byte, cache_dir)
  # Put the byte tokenizer's file where the char tokenizer's cache would be.
  os.replace(_files(cache_dir)[0], cache.path_for(cache_dir, "m0", tokenized.cache_key("m0", scfg, char)))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    src = tokenized.load("m0", scfg, char, cache_dir)
  msgs = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
  assert len(msgs) == 1 and f"written by tokenizer {byte.fingerprint()}, not {char.fingerprint()}" in msgs[0]
  assert src.train.ids.max() < char.vocab_size  # re-tokenized with the right tokenizer
  assert tokenized.load("m0", scfg, char, cache_dir).train.ids.size == src.train.ids.size  # and rewritten


def test_token_ids_outside_the_vocabulary_are_refused(cache_dir):
  scfg = markov_config().data.sources.m0
  tok = tokenizers.ByteTokenizer()
  tokenized.load("m0", scfg, tok, cache_dir)
  path = _files(cache_dir)[0]
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["train_ids"][5] = 9999
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  with pytest.raises(DataError, match=r"data.sources.m0 \(train split, cache .*\): token ids outside the "
                                      r"vocabulary \[0, 262\) \(min 33, max 9999\)"):
    tokenized.load("m0", scfg, tok, cache_dir)


def test_an_unreadable_cache_is_rebuilt(cache_dir):
  scfg = markov_config().data.sources.m0
  tok = tokenizers.ByteTokenizer()
  tokenized.load("m0", scfg, tok, cache_dir)
  with open(_files(cache_dir)[0], "wb") as f:
    f.write(b"truncated")
  with pytest.warns(DataWarning, match="unreadable"):
    assert tokenized.load("m0", scfg, tok, cache_dir).train.num_documents == 190
