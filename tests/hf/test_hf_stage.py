"""`train.init_from=hf:PATH`: an imported model as a stage's origin and frozen reference (one DPO step on a
test-made Llama), its tokenizer everywhere (documents open with BOS), the run's config saying what ran;
and the same origin refused in one line when the directory is not a model."""

import json
import os

import jax
import numpy as np
import pytest
from _hf import fixture_dir, hf_copy, imported

from lmobjective.run import metrics_log


def _pairs(path, n=24):
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "return x", "import os", "def f():", "pass"]
  with open(path, "w") as f:
    for i in range(n):
      a, b = rng.choice(len(words), 2, replace=False)
      f.write(json.dumps({"prompt": f"# item {i}\n", "chosen": " " + words[a], "rejected": " " + words[b]}) + "\n")


def _dpo_config(tmp_path, origin):
  from _stages import stage_config
  pairs = tmp_path / "pairs.jsonl"
  _pairs(pairs)
  return stage_config(tmp_path / "cache", "preference_jsonl", str(pairs), source_fields={"val_fraction": 0.25}, **{
      "objective.kind": "dpo", "objective.beta": 0.1, "train.init_from": f"hf:{origin}", "train.steps": 1,
      "train.batch_size": 4, "eval.batch_size": 4, "eval.num_batches": 1, "eval.every_steps": 1,
      "checkpoint.every_steps": 1, "data.context_length": 32, "train.log_every_steps": 1, "optimizer.warmup_steps": 0})


def test_one_dpo_step_from_an_imported_llama(tmp_path):
  """Step 1 of DPO starts at its reference (the imported params): loss ln 2 exactly as in any stage; the
  run's config carries config.json's model keys and kind=hf; its saved tokenizer is the model's."""
  from lmobjective.data import tokenizers
  from lmobjective.run import train
  origin = hf_copy(tmp_path, "llama")
  config = _dpo_config(tmp_path, origin)
  train.run(config, str(tmp_path / "dpo"))
  lines = metrics_log.read_metrics(str(tmp_path / "dpo"))
  first = next(r for r in lines if "train_loss" in r)
  assert first["train_loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference at step 0
  saved = json.load(open(tmp_path / "dpo" / "config.json"))
  assert saved["model"]["rope_theta"] == 5e5 and saved["model"]["norm_eps"] == 1e-5
  assert saved["model"]["num_kv_heads"] == 2 and saved["model"]["tie_embeddings"] is False
  assert saved["data"]["tokenizer"]["kind"] == "hf" and saved["train"]["init_from"] == f"hf:{origin}"
  tok, _ = tokenizers.load(str(tmp_path / "dpo" / "tokenizer"), key="workdir")
  model_tok, _ = tokenizers.load(origin)
  assert tok.kind == "hf" and tok.fingerprint() == model_tok.fingerprint() and tok.opener_id == tok.bos_id
  import lmobjective
  run = lmobjective.restore(str(tmp_path / "dpo"))
  _, imported_params, _ = imported("llama")
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(imported_params))]
  assert 0 < max(moved) < 1e-2  # one small step away from the import
  train.run(_dpo_config(tmp_path, origin), str(tmp_path / "dpo"))  # done: a rerun resumes and stops
  # and back out: the stage exports with the model's own tokenizer.json, and imports as its params
  from lmobjective.analysis import export as export_cli
  from lmobjective.hf import load as hf_load
  names, note = export_cli.export_run(run, str(tmp_path / "out"))
  assert note is None and "tokenizer.json" in names
  assert open(tmp_path / "out" / "tokenizer.json").read() == open(os.path.join(origin, "tokenizer.json")).read()
  _, back, _ = hf_load.import_model(str(tmp_path / "out"))
  assert all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(run.params)))


def test_one_dpo_step_from_an_imported_gpt2(tmp_path):
  from lmobjective.run import train
  origin = hf_copy(tmp_path, "gpt2")
  train.run(_dpo_config(tmp_path, origin), str(tmp_path / "dpo"))
  first = next(r for r in metrics_log.read_metrics(str(tmp_path / "dpo")) if "train_loss" in r)
  assert first["train_loss"] == pytest.approx(np.log(2), abs=1e-6)
  saved = json.load(open(tmp_path / "dpo" / "config.json"))["model"]
  assert (saved["position"], saved["norm"], saved["mlp"], saved["use_bias"]) == ("learned", "layernorm", "gelu", True)


def test_the_pipeline_opens_documents_with_bos(tmp_path):
  from lmobjective.data import packing, tokenizers
  tok = tokenizers.load_hf(fixture_dir("llama"), json.load(open(os.path.join(fixture_dir("llama"), "config.json"))))
  ids, lengths = tok.encode_flat(["ab", "cde"])
  stream, starts = packing.append_eos(ids, lengths, tok.eos_id, tok.opener_id)
  a, b = tok.encode("ab"), tok.encode("cde")
  assert stream.tolist() == [tok.bos_id] + a + [tok.eos_id, tok.bos_id] + b + [tok.eos_id]
  assert starts.tolist() == [0, len(a) + 2, len(a) + len(b) + 4]


def test_a_directory_that_is_not_a_model_is_refused_before_anything_is_written(tmp_path):
  from lmobjective.config import ConfigError
  from lmobjective.run import train
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ConfigError, match=r"config.train.init_from='hf:.*empty': hf:.*empty: no config.json"):
    train.run(_dpo_config(tmp_path, empty), str(tmp_path / "dpo"))
  assert not (tmp_path / "dpo").exists()


def test_chat_data_with_an_imported_tokenizer_is_refused_in_one_line(tmp_path):
  from lmobjective.config import ConfigError
  from lmobjective.run import train
  origin = hf_copy(tmp_path, "llama")
  config = _dpo_config(tmp_path, origin)
  with open(config.data.sources.preference.path, "w") as f:
    for i in range(24):
      f.write(json.dumps({"prompt": [{"role": "user", "content": f"hi {i}"}], "chosen": "a", "rejected": "b"}) + "\n")
  with pytest.raises(ConfigError, match=r"config.data.tokenizer.kind='hf': tokenizer.json has no '<\|end\|>': chat messages"):
    train.run(config, str(tmp_path / "dpo"))
  assert not (tmp_path / "dpo" / "checkpoints").exists()
