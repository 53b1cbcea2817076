"""No leak across packed documents: the real pipeline's segment ids/positions + the model's mask."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmobjective import data
from lmobjective.model import Transformer
from _tiny import model_config
import importlib.util
import os

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pipeline(tmp_path, masking):
  spec = importlib.util.spec_from_file_location("cfg_default", os.path.join(ROOT, "configs", "default.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  docs = ["short one.", "a second, somewhat longer document", "third", "and a fourth document here"]
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(f'{{"text": "{d}"}}\n' for d in docs * 20))
  c = mod.get_config()
  c.data.context_length = 48
  c.data.document_masking = masking
  c.data.tokenizer.kind = "byte"
  c.data.sources = ml_collections.ConfigDict({"docs": mod.source("jsonl", 1.0, path=str(path))})
  tok = data.build_tokenizer(c.data, str(tmp_path / "run"))
  pipe = data.build_pipeline(c.data, tok, seed=0, batch_size=2, cache_dir=str(tmp_path / "cache"))
  return tok, pipe.batch(0)


@pytest.mark.parametrize("masking", [True, False])
def test_perturbing_document_a_changes_no_logit_of_document_b(tmp_path, masking):
  tok, batch = _pipeline(tmp_path, masking)
  cfg = model_config(vocab_size=tok.vocab_size, num_layers=2, num_heads=2, num_kv_heads=2, embed_dim=32,
                    mlp_dim=64, max_len=48)
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 48), jnp.int32))["params"])
  # Boundaries come from EOS in the real token stream: the row holds several documents.
  eos_in_row = (batch["inputs"][0] == tok.eos_id).sum()
  assert eos_in_row >= 2
  doc = np.cumsum(batch["inputs"][0] == tok.eos_id)  # document index of each input position
  a, b = doc == doc[0], doc == doc[0] + 1
  assert a.sum() > 1 and b.sum() > 1
  inputs = batch["inputs"][:1]
  perturbed = inputs.copy()
  perturbed[0, np.flatnonzero(a)[1:]] = (perturbed[0, np.flatnonzero(a)[1:]] + 7) % 256  # keep EOS
  apply = lambda x: np.asarray(model.apply({"params": params}, x, batch["positions"][:1],
                                           batch["segment_ids"][:1]))
  diff_b = np.abs(apply(inputs)[0, b] - apply(perturbed)[0, b]).max()
  if masking:
    assert diff_b == 0.0  # exactly: document B cannot see document A
    np.testing.assert_array_equal(batch["positions"][0, b], np.arange(b.sum()))  # positions restart
  else:
    assert diff_b > 1e-4  # GPT-style cross-document attention does see it
