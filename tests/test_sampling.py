"""KV-cache decoding against the training forward: logits within float tolerance, greedy tokens equal."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmobjective import model as M
from lmobjective import sampling as gen
from _tiny import model_config

# Large init_std so the logits are far from uniform and greedy decoding does not repeat one token.
MODERN = model_config(vocab_size=97, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, mlp_dim=64,
                       max_len=24, init_std=0.5)  # rope + GQA
GPT2 = dataclasses.replace(MODERN, num_kv_heads=4, position="learned", norm="layernorm", mlp="gelu",
                           use_bias=True, tie_embeddings=False)
SCAN = dataclasses.replace(MODERN, scan_layers=True, num_kv_heads=1)  # MQA, stacked layer cache
_STATIC = ("model", "max_new_tokens", "temperature", "top_k")
generate_cached = jax.jit(gen.generate_cached, static_argnames=_STATIC)
generate_uncached = jax.jit(gen.generate_uncached, static_argnames=_STATIC)
CONFIGS = pytest.mark.parametrize("cfg", [pytest.param(MODERN, marks=pytest.mark.slow), GPT2, SCAN], ids=["rope_gqa", "learned", "scan_mqa"])


def _init(cfg):
  model = M.Transformer(cfg)
  params = M.nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, params


@CONFIGS
def test_cached_logits_equal_the_full_forward(cfg):
  model, params = _init(cfg)
  B, T, P = 2, cfg.max_len, 7
  tokens = jax.random.randint(jax.random.key(2), (B, T), 0, cfg.vocab_size)
  full_BxTxV = model.apply({"params": params}, tokens)
  cache = M.init_cache(cfg, B, T)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  decode = jax.jit(lambda *a: model.apply({"params": params}, *a, method=M.Transformer.decode))
  pieces = [decode(tokens[:, :P], pos[:, :P], cache)]  # prefill, then one token at a time
  cache = pieces[0][1]
  for t in range(P, T):
    logits, cache = decode(tokens[:, t:t + 1], pos[:, t:t + 1], cache)
    pieces.append((logits, cache))
  cached_BxTxV = jnp.concatenate([p[0] for p in pieces], axis=1)
  np.testing.assert_allclose(cached_BxTxV, full_BxTxV, atol=2e-5, rtol=2e-5)
  assert float(jnp.abs(full_BxTxV).max()) > 1.0  # the comparison is not between near-zero logits


@CONFIGS
def test_cached_greedy_generation_equals_uncached(cfg):
  model, params = _init(cfg)
  prompt = jax.random.randint(jax.random.key(3), (2, 5), 0, cfg.vocab_size)
  kw = dict(max_new_tokens=cfg.max_len - 5, temperature=0.0, top_k=None)
  cached = generate_cached(model, params, prompt, jax.random.key(0), **kw)
  plain = generate_uncached(model, params, prompt, jax.random.key(0), **kw)
  assert cached.shape == (2, cfg.max_len - 5)
  np.testing.assert_array_equal(cached, plain)
  assert len(np.unique(np.asarray(cached))) > 3  # a varied sequence, not one token repeated


def test_sampling_is_seeded_and_top_k_restricts():
  model, params = _init(MODERN)
  prompt = jnp.zeros((1, 3), jnp.int32)
  kw = dict(max_new_tokens=12, temperature=1.0, top_k=3)
  a = generate_cached(model, params, prompt, jax.random.key(5), **kw)
  b = generate_cached(model, params, prompt, jax.random.key(5), **kw)
  u = generate_uncached(model, params, prompt, jax.random.key(5), **kw)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, u)  # same keys, same draws
  logits = jnp.array([[0.0, 5.0, 4.0, -1.0, 3.0]])
  draws = {int(gen.sample(logits, jax.random.key(i), 1.0, 2)[0]) for i in range(50)}
  assert draws == {1, 2}


def test_a_broken_cache_is_caught(monkeypatch):
  """The equivalence test must be able to fail: a cache that forgets the newest key breaks it."""
  original = M._update_cache

  def off_by_one(cache, k, v):
    kk, vv, mask, new = original(cache, k, v)
    return kk, vv, mask & (jnp.arange(kk.shape[1]) < new["index"] - 1)[None, None, None, :] | (
        jnp.arange(kk.shape[1]) == 0)[None, None, None, :], new

  monkeypatch.setattr(M, "_update_cache", off_by_one)
  with pytest.raises(AssertionError):
    test_cached_logits_equal_the_full_forward(MODERN)
