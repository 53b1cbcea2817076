"""`tokenizer.json` through the `tokenizers` library: the ids transformers' tokenizer gives (with BOS
where the family's tokenizer adds it), exact round trips and UTF-8 byte counts, BOS/EOS as config.json says."""

import json
import os

import numpy as np
import pytest

from lmobjective.data import tokenizers
from lmobjective.data.errors import DataError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "hf")


def fixture_dir(name):
  return os.path.join(FIXTURES, name)


def refs(name):
  with np.load(os.path.join(fixture_dir(name), "refs.npz"), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def _config(name):
  return json.load(open(os.path.join(fixture_dir(name), "config.json")))


def _load(name):
  return tokenizers.load_hf(fixture_dir(name), _config(name))


@pytest.mark.parametrize("name, opens_with_bos", [("gpt2", False), ("llama", True)])
def test_ids_equal_transformers_tokenizer(name, opens_with_bos):
  tok, r = _load(name), refs(name)
  text = str(r["text"])
  ids = tok.encode(text)
  expected = r["tokenized"].tolist()
  assert ([tok.bos_id] + ids if opens_with_bos else ids) == expected
  tricky = json.load(open(os.path.join(fixture_dir(name), "refs.json")))["tricky"]
  specials = {tok.decode([tok.eos_id]), tok.decode([tok.bos_id])}  # this tokenizer's own control strings
  for case in tricky:
    got = tok.encode(case["text"])
    if any(s in case["text"] for s in specials):
      # text, not control ids: transformers' default would give the special id (split_special_tokens=False)
      assert tok.eos_id not in got and tok.bos_id not in got and tok.decode(got) == case["text"]
      assert got != case["ids"][1 if opens_with_bos else 0:], case["text"]
      continue
    assert ([tok.bos_id] + got if opens_with_bos else got) == case["ids"], case["text"]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_round_trip_and_exact_byte_counts(name):
  tok, r = _load(name), refs(name)
  lengths = tok.token_byte_lengths()
  texts = [str(r["text"])] + [c["text"] for c in json.load(open(os.path.join(fixture_dir(name), "refs.json")))["tricky"]]
  for text in texts:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(lengths[ids].sum()) == len(text.encode("utf-8")), text
  assert int(r["byte_count"]) == len(str(r["text"]).encode("utf-8"))
  assert lengths[tok.eos_id] == 0  # a special token stands for no bytes


def test_bos_and_eos_from_config_json():
  gpt2, llama = _load("gpt2"), _load("llama")
  hf = _config("llama")
  assert (llama.bos_id, llama.eos_id) == (hf["bos_token_id"], hf["eos_token_id"])
  assert llama.decode([llama.bos_id]) == "<|begin_of_text|>" and llama.decode([llama.eos_id]) == "<|end_of_text|>"
  assert gpt2.bos_id == gpt2.eos_id and gpt2.decode([gpt2.eos_id]) == "<|endoftext|>"
  assert llama.opener_id == llama.bos_id != llama.eos_id and gpt2.opener_id == gpt2.eos_id  # what opens a document
  # without config.json's ids, tokenizer_config.json names them
  alone = tokenizers.load_hf(fixture_dir("llama"))
  assert (alone.bos_id, alone.eos_id) == (llama.bos_id, llama.eos_id)


def test_bad_tokenizer_is_one_line(tmp_path):
  with pytest.raises(DataError, match="no tokenizer.json"):
    tokenizers.load_hf(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(DataError, match="tokenizer.json: not a tokenizers file"):
    tokenizers.load_hf(str(tmp_path), {"eos_token_id": 0})


def test_saved_in_a_run_and_loaded_back(tmp_path):
  """data.tokenizer.kind=hf: `tokenizers.load` opens a model directory's tokenizer.json (BOS/EOS from its
  config.json) and a run's saved copy (hf_tokenizer.json beside this package's tokenizer.json) the same."""
  tok, spec = tokenizers.load(fixture_dir("llama"))
  assert tok.kind == "hf" and spec == {"kind": "hf"} and (tok.bos_id, tok.eos_id) == (_load("llama").bos_id, _load("llama").eos_id)
  tokenizers.save(tok, str(tmp_path / "tokenizer"), spec)
  again, _ = tokenizers.load(str(tmp_path / "tokenizer"))
  assert again.fingerprint() == tok.fingerprint() and again.opener_id == tok.bos_id
  text = str(refs("llama")["text"])
  assert again.encode(text) == tok.encode(text)
