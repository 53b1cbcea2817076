"""Against transformers itself, where it is installed (`pytest -m hfref`; pip install torch==2.13.0
transformers==5.17.0, the CPU wheel on this disk): the committed fixtures regenerate identically, every
export loads with `AutoModelForCausalLM.from_pretrained` and gives the imported logits, and a model this
package initialised (not imported) exports to the same logits."""

import dataclasses
import os
import sys

import numpy as np
import pytest
from _hf import FIXTURES, MODELS, ROOT, imported, refs

pytestmark = pytest.mark.hfref
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))


def _their_logits(path, ids):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.numpy()


def test_fixtures_regenerate_identically():
  import make_hf_refs
  assert make_hf_refs.check(FIXTURES) == []


@pytest.mark.parametrize("name", MODELS)
def test_export_loads_in_transformers_with_the_same_logits(name, tmp_path):
  from lmobjective.hf import export
  model, params, hf = imported(name)
  export.write(params, model.cfg, str(tmp_path / "out"), bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"),
               family=hf["model_type"])
  r = refs(name)
  np.testing.assert_allclose(_their_logits(str(tmp_path / "out"), r["ids"])[:, r["logits_positions"]], r["logits"],
                             atol=1e-5, rtol=0)


@pytest.mark.parametrize("changes", [{}, {"qk_norm": True, "head_dim": 16}, {"attention_bias": "qkv"},
                                     {"attention_bias": "qkvo", "mlp_bias": True, "tie_embeddings": False}])
def test_a_model_initialised_here_exports_to_its_own_logits(changes, tmp_path):
  """Random init (std 0.5), not an import: what `export` writes is what this model computes."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from lmobjective.hf import export
  from lmobjective.model import Transformer
  base, _, _ = imported("llama")
  cfg = dataclasses.replace(base.cfg, init_std=0.5, **changes)
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  # norm scales start at 1 and biases at 0: move every parameter, so that none can be dropped unseen
  params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(x.size), x.shape), params)
  export.write(params, cfg, str(tmp_path / "out"), bos_id=1, eos_id=2)
  ids = refs("llama")["ids"]
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
  np.testing.assert_allclose(_their_logits(str(tmp_path / "out"), ids), ours, atol=1e-4, rtol=0)
