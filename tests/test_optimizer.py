"""Learning-rate schedules against closed forms; weight-decay mask on a real parameter tree."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmobjective import model as M
from lmobjective import optimizer
from lmobjective.config import load_config_file
from _tiny import ROOT, model_config


def _opt(**kw):
  """configs/default.py's optimizer section with these values, and `kw` on top."""
  base = load_config_file(os.path.join(ROOT, "configs", "default.py")).optimizer
  base.update(dict(learning_rate=1e-3, end_learning_rate=1e-4, schedule="cosine", warmup_steps=10,
                   decay_steps=110, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_embeddings=False,
                   decay_norms_and_biases=False, grad_clip=1.0))
  base.update(kw)
  return base


def test_warmup_then_cosine_closed_form():
  sched = optimizer.learning_rate_schedule(_opt())
  for s in range(10):
    assert abs(float(sched(s)) - 1e-3 * (s + 1) / 10) < 1e-10
  for s in [10, 35, 60, 85, 110]:
    frac = (s - 10) / 100
    want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * frac))
    assert abs(float(sched(s)) - want) < 1e-9, s
  assert float(sched(500)) == pytest.approx(1e-4, rel=1e-6)  # holds the end rate after decay_steps


def test_linear_and_constant_schedules():
  lin = optimizer.learning_rate_schedule(_opt(schedule="linear"))
  assert abs(float(lin(60)) - (1e-3 + 1e-4) / 2) < 1e-9
  const = optimizer.learning_rate_schedule(_opt(schedule="constant"))
  assert float(const(10)) == float(const(1000)) == pytest.approx(1e-3)
  no_warm = optimizer.learning_rate_schedule(_opt(warmup_steps=0))
  assert float(no_warm(0)) == pytest.approx(1e-3)


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_mask_excludes_norms_biases_embeddings(tie):
  cfg = model_config(vocab_size=32, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=16, mlp_dim=32,
                      max_len=8, use_bias=True, norm="layernorm", position="learned", tie_embeddings=tie)
  params = nn.unbox(M.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  mask = optimizer.weight_decay_mask(params)
  flat = {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["block_0/attn/query/kernel"] and flat["block_0/mlp/up/kernel"] and flat["block_0/mlp/down/kernel"]
  assert not flat["block_0/attn/query/bias"] and not flat["block_0/attn_norm/scale"]
  assert not flat["block_0/attn_norm/bias"] and not flat["final_norm/scale"]
  assert not flat["token_embed/embedding"] and not flat["position_embed/embedding"]
  if not tie:
    assert flat["lm_head/kernel"]  # an untied head is a matrix like any other
  all_on = optimizer.weight_decay_mask(params, decay_embeddings=True, decay_norms_and_biases=True)
  assert all(jax.tree.leaves(all_on))


def test_adamw_applies_decay_only_where_masked():
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  tx = optimizer.make_optimizer(_opt(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=0.0))
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, state, params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)  # decoupled decay
  np.testing.assert_allclose(updates["scale"], 0.0)


def test_grad_clip_bounds_the_global_norm():
  params = {"w": jnp.zeros((3,))}
  tx = optimizer.make_optimizer(_opt(schedule="constant", warmup_steps=0, learning_rate=1.0, b1=0.0,
                                     b2=0.0, eps=1e-12, weight_decay=0.0, grad_clip=1.0))
  # clip first, then adam: with b1=b2=0 adam returns sign(g); the clip itself is checked on its own
  clip = optimizer.optax.clip_by_global_norm(1.0)
  g = {"w": jnp.array([3.0, 4.0, 0.0])}
  clipped, _ = clip.update(g, clip.init(params))
  np.testing.assert_allclose(clipped["w"], [0.6, 0.8, 0.0], rtol=1e-6)
  upd, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(upd["w"], [-1.0, -1.0, 0.0], atol=1e-6)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction():
  # decay_steps 100, warmup 10, decay_fraction 0.2: warmup 0-9, the peak 10-79, linear 80-100.
  sched = optimizer.learning_rate_schedule(_opt(schedule="wsd", decay_steps=100, decay_fraction=0.2))
  table = {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3, 50: 1e-3, 79: 1e-3, 80: 1e-3, 85: 7.75e-4, 90: 5.5e-4,
           95: 3.25e-4, 99: 1.45e-4, 100: 1e-4, 300: 1e-4}
  for s, want in table.items():
    assert float(sched(s)) == pytest.approx(want, rel=1e-6, abs=1e-12), s
  muon = optimizer.learning_rate_schedule(_opt(schedule="wsd", decay_steps=100), peak=0.02)
  for s, want in table.items():  # the Muon group: the same shape, scaled by 0.02 / 1e-3
    assert float(muon(s)) == pytest.approx(want * 20, rel=1e-6), s

