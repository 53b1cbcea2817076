"""Model: initial loss ~ ln V, causality and document isolation by exact gradients, FLOP formula."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmobjective import model as M
from lmobjective.objectives import next_token
from _tiny import model_config

MODERN = model_config(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                       mlp_dim=128, max_len=64)
GPT2 = dataclasses.replace(MODERN, num_kv_heads=4, position="learned", norm="layernorm", norm_eps=1e-5, mlp="gelu",
                           use_bias=True, tie_embeddings=False)


def _init(cfg, T=16, seed=0):
  model = M.Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, T), jnp.int32))["params"])
  return model, params


@pytest.mark.parametrize("cfg", [MODERN, GPT2], ids=["modern", "gpt2"])
def test_initial_loss_is_ln_v(cfg):
  cfg = dataclasses.replace(cfg, vocab_size=4096)
  model, params = _init(cfg, T=64)
  tokens = jax.random.randint(jax.random.key(1), (8, 65), 0, cfg.vocab_size)
  logits = jax.jit(model.apply)({"params": params}, tokens[:, :-1])  # compiled: op by op took ~9 s
  loss_sum, n = next_token.cross_entropy(logits, tokens[:, 1:])
  assert abs(float(loss_sum) / int(n) - math.log(cfg.vocab_size)) < 0.1


def _per_position_loss_grads(cfg, segment_ids=None, T=12):
  """d nll[t] / d embedding[s] for all t, s: [T(query), B, T(key), D]."""
  model, params = _init(cfg, T)
  tokens = jax.random.randint(jax.random.key(2), (2, T + 1), 0, cfg.vocab_size)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  positions = None
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    positions = np.zeros_like(seg)
    for b in range(seg.shape[0]):
      for t in range(1, T):
        positions[b, t] = positions[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    positions = jnp.asarray(positions)
  x = model.apply({"params": params}, inputs, positions, method=M.Transformer.embed)

  def nll_per_position(x):
    h = model.apply({"params": params}, x, positions, segment_ids, method=M.Transformer.backbone)
    logits = model.apply({"params": params}, h, method=M.Transformer.head)
    return next_token.token_losses(logits, targets).nll.sum(0)  # [T]

  return np.asarray(jax.jit(jax.jacrev(nll_per_position))(x))


@pytest.mark.parametrize("cfg", [MODERN, GPT2], ids=["modern", "gpt2"])
def test_causality_future_gradients_are_exactly_zero(cfg):
  g = np.abs(_per_position_loss_grads(cfg)).sum(-1)  # [T, B, T]
  T = g.shape[0]
  for t in range(T):
    assert np.all(g[t, :, t + 1:] == 0.0), f"position {t} sees the future"
    assert np.all(g[t, :, : t + 1] > 0.0), f"position {t} is blind to its past"


def test_segment_mask_isolates_documents():
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 0],
                   [1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 0, 0]], jnp.int32)
  g = np.abs(_per_position_loss_grads(MODERN, seg)).sum(-1)  # [T, B, T]
  s = np.asarray(seg)
  for b in range(2):
    for t in range(12):
      other_doc = (s[b] != s[b, t])
      assert np.all(g[t, b, other_doc] == 0.0), (b, t)
      same_past = (s[b] == s[b, t]) & (np.arange(12) <= t)
      assert np.all(g[t, b, same_past] > 0.0), (b, t)


@pytest.mark.parametrize("cfg", [MODERN, GPT2], ids=["modern", "gpt2"])
def test_perturbing_one_document_leaves_the_next_unchanged(cfg):
  model, params = _init(cfg, 10)
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2]], jnp.int32)
  pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]], jnp.int32)
  a = jnp.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]], jnp.int32)
  b = a.at[0, :4].set(jnp.array([100, 200, 300, 400]))
  la = model.apply({"params": params}, a, pos, seg)
  lb = model.apply({"params": params}, b, pos, seg)
  np.testing.assert_array_equal(np.asarray(la[0, 4:]), np.asarray(lb[0, 4:]))
  assert np.abs(np.asarray(la[0, :4] - lb[0, :4])).max() > 1e-3
  # Without the mask the second document does see the first (GPT-style cross-document attention).
  lc = model.apply({"params": params}, a, pos, jnp.ones_like(seg))
  ld = model.apply({"params": params}, b, pos, jnp.ones_like(seg))
  assert np.abs(np.asarray(lc[0, 4:] - ld[0, 4:])).max() > 1e-4


@pytest.mark.parametrize("cfg,extra", [(MODERN, 0), (GPT2, 64 * 64 + 512 * 64),
                                       (dataclasses.replace(MODERN, tie_embeddings=False), 512 * 64),
                                       (dataclasses.replace(MODERN, qk_norm=True, mlp="relu2"), 0)],
                         ids=["modern-tied", "gpt2-untied", "modern-untied", "qk_norm-relu2"])
def test_flop_formula_params_match_the_real_count(cfg, extra):
  # matmul_params counts the head once and no embedding lookups; the real tree also has the
  # position table (learned) and the input embedding when untied.
  _, params = _init(cfg)
  assert M.count_params(params) == M.matmul_params(cfg) + extra
  T = 128
  assert M.flops_per_token(cfg, T) == 6 * M.matmul_params(cfg) + 12 * cfg.num_layers * cfg.embed_dim * T


def test_gqa_matches_mha_with_repeated_kv_heads():
  gqa = MODERN
  mha = dataclasses.replace(MODERN, num_kv_heads=MODERN.num_heads)
  model_g, p_g = _init(gqa)
  model_m, p_m = _init(mha)
  rep = MODERN.num_heads // MODERN.num_kv_heads
  p_m = jax.tree.map(lambda x: x, p_m)
  for i in range(MODERN.num_layers):
    for name in ("key", "value"):
      k = p_g[f"block_{i}"]["attn"][name]["kernel"]  # [D, K, H]
      p_m[f"block_{i}"]["attn"][name]["kernel"] = jnp.repeat(k, rep, axis=1)
    for name in ("query", "out"):
      p_m[f"block_{i}"]["attn"][name] = p_g[f"block_{i}"]["attn"][name]
    for name in ("attn_norm", "mlp_norm", "mlp"):
      p_m[f"block_{i}"][name] = p_g[f"block_{i}"][name]
  p_m["token_embed"], p_m["final_norm"] = p_g["token_embed"], p_g["final_norm"]
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 512)
  np.testing.assert_allclose(np.asarray(model_g.apply({"params": p_g}, tokens)),
                             np.asarray(model_m.apply({"params": p_m}, tokens)), atol=1e-5)


@pytest.mark.parametrize("remat", [pytest.param("full", marks=pytest.mark.slow), "dots_saveable"])
def test_remat_gives_the_same_loss_and_gradients(remat):
  model, params = _init(MODERN)
  model_r = M.Transformer(dataclasses.replace(MODERN, remat=remat))
  tokens = jax.random.randint(jax.random.key(4), (2, 17), 0, 512)

  def loss(p, m):
    return next_token.cross_entropy(m.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])[0]

  grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # remat is what the compiled program does
  l0, g0 = grads(params, model)
  l1, g1 = grads(params, model_r)
  assert abs(float(l0) - float(l1)) < 1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_scan_layers_matches_unrolled_layers():
  model, params = _init(MODERN)
  scanned = M.Transformer(dataclasses.replace(MODERN, scan_layers=True))
  stacked = {k: v for k, v in params.items() if not k.startswith("block_")}
  stacked["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *[params[f"block_{i}"] for i in range(MODERN.num_layers)])
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, 512)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, tokens)),
                             np.asarray(scanned.apply({"params": stacked}, tokens)), atol=1e-5)


def test_bf16_compute_keeps_float32_params_and_finite_loss():
  cfg = dataclasses.replace(MODERN, compute_dtype=jnp.bfloat16)
  model, params = _init(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens = jax.random.randint(jax.random.key(6), (2, 17), 0, 512)
  logits = model.apply({"params": params}, tokens[:, :-1])
  assert logits.dtype == jnp.bfloat16
  loss_sum, n = next_token.cross_entropy(logits, tokens[:, 1:])
  assert abs(float(loss_sum) / int(n) - math.log(512)) < 0.2


def test_dropout_uses_the_explicit_key():
  cfg = dataclasses.replace(MODERN, dropout=0.5)
  model, params = _init(cfg)
  tokens = jnp.ones((1, 8), jnp.int32)
  run = lambda k: np.asarray(model.apply({"params": params}, tokens, deterministic=False,
                                         rngs={"dropout": jax.random.key(k)}))
  np.testing.assert_array_equal(run(0), run(0))
  assert np.abs(run(0) - run(1)).max() > 0
  det = np.asarray(model.apply({"params": params}, tokens))
  np.testing.assert_array_equal(det, np.asarray(model.apply({"params": params}, tokens)))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_a_share_1_minus_p_scaled_by_1_over_1_minus_p(p):
  """Inverted dropout on the embeddings: each unit is kept with probability 1 - p and scaled by
  1/(1 - p), so the expectation is the deterministic output. 64 x 64 x 64 = 262,144 units: the kept
  share's standard error is at most 0.001, and the test allows 5 of them."""
  model, params = _init(dataclasses.replace(MODERN, dropout=p))
  tokens = jax.random.randint(jax.random.key(3), (64, 64), 0, 512)
  embed = lambda **kw: np.asarray(model.apply({"params": params}, tokens, method="embed", **kw), np.float64)
  base = embed(deterministic=True)
  dropped = embed(deterministic=False, rngs={"dropout": jax.random.key(4)})
  kept = dropped != 0
  assert np.all(base != 0)  # a zero could only come from dropout
  assert abs(kept.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / kept.size)
  np.testing.assert_allclose(dropped[kept], base[kept] / (1 - p), rtol=1e-6)


def test_qk_norm_hands_attention_unit_rms_queries_and_keys_per_head(monkeypatch):
  """With model.qk_norm (scales at their init, 1) each head's q and k reaching attention have RMS 1
  over head_dim, after rope as before it (rope rotates channel pairs); without it they do not."""
  seen = []
  attend = jax.nn.dot_product_attention

  def recording(q, k, v, **kw):
    seen.append((np.asarray(q, np.float64), np.asarray(k, np.float64)))
    return attend(q, k, v, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  tokens = jax.random.randint(jax.random.key(7), (2, 16), 0, 512)
  rms = lambda x: np.sqrt(np.mean(x ** 2, axis=-1))  # [B, T, heads]
  for qk_norm in (True, False):
    model, params = _init(dataclasses.replace(MODERN, qk_norm=qk_norm))
    seen.clear()  # init ran attention too
    model.apply({"params": params}, tokens)
    assert len(seen) == MODERN.num_layers
    for q, k in seen:
      assert q.shape[2:] == (4, 16) and k.shape[2:] == (2, 16)  # N=4 query heads, K=2 kv heads, H=16
      if qk_norm:  # eps 1e-6 against a mean square of ~1e-2 (init std 0.02 over D=64): 1 - 5e-5
        np.testing.assert_allclose(rms(q), 1.0, atol=1e-4)
        np.testing.assert_allclose(rms(k), 1.0, atol=1e-4)
      else:
        assert np.abs(rms(q) - 1.0).min() > 0.5 and np.abs(rms(k) - 1.0).min() > 0.5
  assert set(params["block_0"]["attn"]) == {"query", "key", "value", "out"}  # the last run: no norm params
  _, normed = _init(dataclasses.replace(MODERN, qk_norm=True))
  assert normed["block_0"]["attn"]["query_norm"]["scale"].shape == (16,)  # one scale per head_dim channel


def test_relu2_mlp_is_relu_squared_of_its_kernels():
  cfg = dataclasses.replace(MODERN, mlp="relu2")
  x = np.random.default_rng(0).normal(size=(2, 5, cfg.embed_dim))
  mlp = M.Mlp(cfg)
  params = nn.unbox(mlp.init(jax.random.key(0), jnp.asarray(x, jnp.float32), True)["params"])
  assert set(params) == {"up", "down"}  # ungated
  got = np.asarray(mlp.apply({"params": params}, jnp.asarray(x, jnp.float32), True))
  up, down = (np.asarray(params[n]["kernel"], np.float64) for n in ("up", "down"))
  want = np.maximum(x @ up, 0.0) ** 2 @ down
  assert np.abs(want).max() > 1e-3  # not a comparison of zeros
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
