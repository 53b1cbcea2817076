"""Export: import -> export gives the fixture's tensors bit for bit and a config.json that imports as
the same model; a model with no Hugging Face form is refused in one line. Against transformers itself
(`from_pretrained` of the export, its logits): the `hfref` tests."""

import json
import os

import numpy as np
import pytest
from _hf import MODELS, fixture_dir, imported

from lmobjective.hf import configs, export
from lmobjective.hf.configs import HFError
from lmobjective.hf.safetensors_dir import SafetensorsDir


def _tensors(path: str) -> dict:
  ckpt = SafetensorsDir(path)
  return {k: ckpt.read(k) for k in ckpt.keys()}


@pytest.mark.parametrize("name", MODELS)
def test_import_then_export_is_bit_identical(name, tmp_path):
  model, params, hf = imported(name)
  out = str(tmp_path / "out")
  written = export.write(params, model.cfg, out, bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"),
                         family=hf["model_type"])
  theirs, ours = _tensors(fixture_dir(name)), _tensors(out)
  theirs = {k: v for k, v in theirs.items() if not (k == "lm_head.weight" and model.cfg.tie_embeddings)}
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    assert ours[k].dtype == theirs[k].dtype == np.float32
    assert np.array_equal(ours[k].view(np.uint32), theirs[k].view(np.uint32)), k
  exported = configs.read(out)
  assert configs.model_keys(exported, "config.json") == configs.model_keys(hf, "config.json")
  assert "model.safetensors" in written


def test_shards_above_the_size_limit(tmp_path):
  model, params, hf = imported("llama")
  out = str(tmp_path / "sharded")
  written = export.write(params, model.cfg, out, bos_id=1, eos_id=2, max_shard_size=20_000)
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert set(written) >= set(shards) | {"model.safetensors.index.json", "config.json"}
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in _tensors(out).values())
  theirs = _tensors(fixture_dir("llama"))
  assert all(np.array_equal(v, theirs[k]) for k, v in _tensors(out).items())


def test_family_follows_the_model_keys():
  import dataclasses
  model, _, _ = imported("llama")
  cfg = model.cfg
  assert export.family_of(cfg) == "llama"
  assert export.family_of(dataclasses.replace(cfg, attention_bias="qkv")) == "qwen2"
  assert export.family_of(dataclasses.replace(cfg, qk_norm=True)) == "qwen3"
  assert export.family_of(imported("gpt2")[0].cfg) == "gpt2"
  with pytest.raises(HFError, match="config.model.mlp='relu2'.*no Hugging Face architecture"):
    export.family_of(dataclasses.replace(cfg, mlp="relu2"))
  with pytest.raises(HFError, match="config.model.norm='layernorm'"):
    export.family_of(dataclasses.replace(cfg, norm="layernorm"))
