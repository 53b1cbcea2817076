"""Bad input: each stops with one line naming the source, file or key."""

import json
import os

import pytest

from conftest import file_config, markov_config
from tests._tiny import ROOT, set_key

from configs import default
from lmobjective import data, validation
from lmobjective.config import ConfigError, load_config_file
from lmobjective.data import tokenizers


def _raises(fn, needle):
  with pytest.raises(ConfigError) as e:
    fn()
  msg = str(e.value)
  assert needle in msg, msg
  assert "\n" not in msg


def _build(cfg, tmp_path):
  return data.build_pipeline(cfg.data, tokenizers.ByteTokenizer(), seed=0, batch_size=2,
                             cache_dir=str(tmp_path / "c"))


# Each shipped config with the keys it cannot run without, in the order validate() asks for them
# (SFT may start from scratch: train.init_from is optional there).
PRESETS = {"default.py": {}, "tiny.py": {}, "markov.py": {}, "gpt2_124m.py": {},
           "char_fast.py": {"data.sources.text.path": "FILE"},
           "sft.py": {"data.sources.chat.path": "chat.jsonl"},
           "dpo.py": {"train.init_from": "runs/sft", "data.sources.pairs.path": "pairs.jsonl"},
           "reward_model.py": {"data.sources.pairs.path": "pairs.jsonl"},
           "stack.py:pretrain": {}, "stack.py:sft": {},
           "stack.py:dpo": {"train.init_from": "runs/stack/sft"}, "stack.py:dpo,quick": {"train.init_from": "runs/stack/sft"},
           "stack.py:reward_model": {}, "stack.py:ppo,quick": {"train.init_from": "runs/stack/sft"},
           "stack.py:rloo": {"train.init_from": "runs/stack/sft"},
           "addition.py:pretrain": {}, "addition.py:sft": {}, "addition.py:rl": {"train.init_from": "runs/rl_addition/sft"},
           "overoptimization.py:proxy": {"data.sources.pairs.path": "pairs.jsonl"},
           "overoptimization.py:ppo,quick": {"train.init_from": "runs/stack/sft"},
           "overoptimization.py:rloo": {"train.init_from": "runs/stack/sft"}}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_valid_and_one_bad_key_in_it_is_not(preset):
  """validate() passes each shipped config as its launch line sets it, refuses it without those
  keys, and refuses it with one key broken, in one line naming that key: the pass is validate
  reading this config, not validate doing nothing."""
  c = load_config_file(os.path.join(ROOT, "configs", preset))
  for key, value in PRESETS[preset].items():
    _raises(lambda: validation.validate(c), f"config.{key}=None")
    set_key(c, key, value)
  assert validation.validate(c) is None
  c.train.steps = 0
  _raises(lambda: validation.validate(c), "config.train.steps=0: must be")


def test_the_preset_list_is_every_config_file():
  assert {p.partition(":")[0] for p in PRESETS} == {f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py")}


@pytest.mark.parametrize("key,value,needle", [
    ("context_length", 0, "config.data.context_length=0: must be in [1, inf]"),
    ("context_length", 256, "config.data.context_length=256: must be <= model.max_len=128"),
    ("packing", "zigzag", "config.data.packing='zigzag': must be one of concat, window"),
])
def test_bad_data_keys(key, value, needle):
  c = default.get_config()
  c.model.max_len = 128  # set apart from data.context_length (None would follow it)
  c.data[key] = value
  _raises(lambda: validation.validate(c), needle)


@pytest.mark.parametrize("field,value,needle", [
    ("weight", -1.0, "config.data.sources.code.weight=-1.0: must be >= 0.0"),
    ("weight", float("nan"), "config.data.sources.code.weight=nan: must be a finite number"),
    ("kind", "csv", "config.data.sources.code.kind='csv': must be one of"),
    ("val_fraction", 0.9, "config.data.sources.code.val_fraction=0.9: must be <= 0.5"),
])
def test_bad_source_fields(field, value, needle):
  c = default.get_config()
  c.data.sources.code[field] = value
  _raises(lambda: validation.validate(c), needle)


def test_zero_sum_weights():
  c = default.get_config()
  for s in c.data.sources.values():
    s.weight = 0.0
  _raises(lambda: validation.validate(c), "config.data.sources.*.weight=")
  _raises(lambda: validation.validate(c), "at least one weight must be > 0")


def test_file_source_without_path():
  c = default.get_config()
  c.data.sources.code = default.source("jsonl", 1.0)
  _raises(lambda: validation.validate(c), "config.data.sources.code.path=None: required for kind=jsonl")


def test_missing_path(tmp_path):
  _raises(lambda: _build(file_config("text", tmp_path / "nope*.txt"), tmp_path),
          f"config.data.sources.f.path='{tmp_path / 'nope*.txt'}': matches no file")


def test_empty_file(tmp_path):
  (tmp_path / "e.jsonl").write_text("\n")
  _raises(lambda: _build(file_config("jsonl", tmp_path / "e.jsonl"), tmp_path),
          f"config.data.sources.f.path='{tmp_path / 'e.jsonl'}': file is empty")


def test_no_documents_after_the_split(tmp_path):
  (tmp_path / "one.jsonl").write_text(json.dumps({"text": "only one"}) + "\n")
  _raises(lambda: _build(file_config("jsonl", tmp_path / "one.jsonl"), tmp_path),
          "source 'f' has no training documents after the validation split")


def test_too_few_tokens_for_a_row(tmp_path):
  (tmp_path / "s.txt").write_text("tiny\n")
  _raises(lambda: _build(file_config("text", tmp_path / "s.txt", T=64, val_fraction=0.0), tmp_path),
          "config.data.context_length=64: source 'f' has 6 training tokens, too few for one row of context_length+1=65")


def test_missing_text_field_and_bad_json(tmp_path):
  (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
  _raises(lambda: _build(file_config("jsonl", tmp_path / "d.jsonl"), tmp_path),
          f"config.data.sources.f.text_field='text': {tmp_path / 'd.jsonl'}:1: record has no field of that name")
  (tmp_path / "b.jsonl").write_text('{"text": "a"}\n{oops\n')
  _raises(lambda: _build(file_config("jsonl", tmp_path / "b.jsonl"), tmp_path),
          f"config.data.sources.f.path='{tmp_path / 'b.jsonl'}:2': invalid JSON")


def test_no_validation_rows(tmp_path):
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": "x" * 40}) + "\n" for _ in range(10)))
  pipe = _build(file_config("jsonl", tmp_path / "d.jsonl", T=64, val_fraction=0.1), tmp_path)
  _raises(lambda: pipe.eval_batches("f", 1, 2), "config.data.sources.f.val_fraction=0.1: source 'f' has 41 "
          "validation tokens, too few for one row of context_length+1=65")


def test_unknown_source_name(tmp_path):
  pipe = _build(markov_config((1.0,)), tmp_path)
  _raises(lambda: pipe.eval_batches("web", 1, 2), "config.eval source='web': unknown source; must be one of m0")


def test_markov_and_tokenizer_keys():
  c = default.get_config()
  c.data.sources.markov.markov.num_symbols = 200
  _raises(lambda: validation.validate(c), "config.data.sources.markov.markov.num_symbols=200: must be in [2, 94]")
  c = default.get_config()
  c.data.tokenizer.kind = "wordpiece"
  _raises(lambda: validation.validate(c), "config.data.tokenizer.kind='wordpiece': must be one of sentencepiece, char, byte")
