"""tokenizers.py + tokenizer_build.py: determinism across processes, exact round trips and byte counts."""

import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import default
from lmobjective import data
from lmobjective.config import ConfigError
from lmobjective.data import stdlib_corpus, tokenizer_build, tokenizers

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CODE = ("class A:\n    def f(self, x):\n\tif x:  # tab\n        return 'é ü 🙂 漢字'\n\n\n"
        "    pass   \n  \n\r\nz = [1,  2]\n")


def _small_config(kind="sentencepiece", model_type="bpe", vocab_size=512):
  c = default.get_config()
  c.data.tokenizer.kind, c.data.tokenizer.model_type, c.data.tokenizer.vocab_size = kind, model_type, vocab_size
  c.data.tokenizer.sample_lines = 20_000
  c.data.sources = ml_collections.ConfigDict()
  c.data.sources.code = default.source("python_stdlib", 0.7, max_documents=120)
  c.data.sources.markov = default.source("markov", 0.3)
  return c


@pytest.fixture(scope="module")
def spm_tok():
  return tokenizer_build.train(_small_config().data)


@pytest.fixture(scope="module")
def all_toks(spm_tok):
  return {"spm": spm_tok, "char": tokenizer_build.train(_small_config("char").data), "byte": tokenizers.ByteTokenizer()}


def _real_texts():
  files = stdlib_corpus.stdlib_files()
  code = [open(f, encoding="utf-8").read() for f in files[::97]]
  from pydoc_data import topics
  return code + [topics.topics["if"], topics.topics["strings"]]


@pytest.mark.slow
def test_spm_is_deterministic_across_two_processes(tmp_path):
  """The standalone CLI, run twice in parallel subprocesses, writes byte-identical models."""
  args = ["--config=configs/default.py", "--config.data.tokenizer.sample_lines=20000",
          "--config.data.tokenizer.vocab_size=512"]
  procs = [subprocess.Popen([sys.executable, "-m", "lmobjective.run.train_tokenizer", *args,
                             f"--output={tmp_path / str(i)}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE) for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][1].decode()[-2000:]
  models = [(tmp_path / str(i) / "tokenizer" / "spm.model").read_bytes() for i in range(2)]
  assert len(models[0]) > 1000 and models[0] == models[1]
  assert b"vocab_size=512" in outs[0][0]


@pytest.mark.parametrize("name", ["spm", "char", "byte"])
def test_round_trip_code_with_indentation_newlines_unicode(all_toks, name):
  tok = all_toks[name]
  for text in (CODE, "", " ", "\n\n", "x" * 3000, *_real_texts()[:3]):
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode_batch([CODE, "a"]) == [tok.encode(CODE), tok.encode("a")]


@pytest.mark.parametrize("name", ["spm", "char", "byte"])
def test_token_byte_lengths_sum_to_utf8_bytes(all_toks, name):
  tok = all_toks[name]
  lengths = tok.token_byte_lengths()
  assert lengths.shape == (tok.vocab_size,) and lengths.dtype == np.int32
  assert lengths[tok.eos_id] == 0 and lengths[tok.pad_id] == 0
  texts = _real_texts() + [CODE]
  ids, _ = tok.encode_flat(texts)
  assert int(lengths[ids].sum()) == sum(len(t.encode("utf-8")) for t in texts)


def test_spm_keeps_indentation_and_newlines_as_pieces(spm_tok):
  sp = spm_tok._sp
  pieces = sp.encode("def f():\n        return 1\n", out_type=str)
  assert "\n" in pieces and any(set(p) == {"\u2581"} and len(p) >= 4 for p in pieces)
  assert spm_tok.special_id("<|assistant|>") == sp.piece_to_id("<|assistant|>") > 2
  assert spm_tok.pad_id == 0 and spm_tok.eos_id == 2 and spm_tok.vocab_size == 512


def test_unigram_trains():
  cfg = _small_config(model_type="unigram", vocab_size=400)
  cfg.data.tokenizer.sample_lines = 4000  # unigram EM is slow on long random (markov) lines: code only
  cfg.data.sources.markov.weight = 0.0
  cfg.data.sources.code.max_documents = 60
  tok = tokenizer_build.train(cfg.data)
  assert tok.vocab_size == 400 and tok.decode(tok.encode(CODE)) == CODE


def test_char_tokenizer_falls_back_to_bytes_for_unseen_characters():
  tok = tokenizers.CharTokenizer("abc\n")
  ids = tok.encode("ab\u00e9")
  assert ids[:2] == [tok.vocab_size - 4 + 1, tok.vocab_size - 4 + 2] and len(ids) == 4  # é = 2 bytes
  assert tok.decode(ids) == "ab\u00e9"


def test_build_tokenizer_saves_and_reuses(tmp_path, monkeypatch):
  cfg = _small_config("char")
  tok = data.build_tokenizer(cfg.data, str(tmp_path))
  assert os.path.isfile(tmp_path / "tokenizer" / "tokenizer.json")
  monkeypatch.setattr(tokenizer_build, "train", lambda *_: pytest.fail("retrained instead of reusing"))
  again = data.build_tokenizer(cfg.data, str(tmp_path))
  assert again.fingerprint() == tok.fingerprint() and again.vocab_size == tok.vocab_size
  cfg.data.tokenizer.kind = "byte"
  with pytest.raises(ConfigError, match=r"config.data.tokenizer.kind='byte': the run's saved tokenizer .* has kind='char'"):
    data.build_tokenizer(cfg.data, str(tmp_path))


def test_build_tokenizer_from_path(tmp_path, spm_tok):
  tokenizers.save(spm_tok, str(tmp_path / "src"), tokenizers.spec(_small_config().data.tokenizer))
  cfg = _small_config()
  cfg.data.tokenizer.path = str(tmp_path / "src")
  tok = data.build_tokenizer(cfg.data, str(tmp_path / "run"))
  assert tok.fingerprint() == spm_tok.fingerprint()
  assert (tmp_path / "run" / "tokenizer" / "spm.model").read_bytes() == spm_tok.payload()
  bare = tokenizers.load(str(tmp_path / "src" / "spm.model"))[0]
  assert bare.fingerprint() == spm_tok.fingerprint()
