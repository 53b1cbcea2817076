"""Chunked (fused head + loss) cross-entropy equals the dense one: loss, gradients, masks, memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmobjective.objectives import next_token
from lmobjective.model import Transformer
from _tiny import model_config

B, T, D, V = 3, 12, 16, 50


def _inputs(seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  h = jax.random.normal(k1, (B, T, D), jnp.float32)
  w = jax.random.normal(k2, (D, V), jnp.float32) * 0.5
  targets = jax.random.randint(k3, (B, T), 0, V)
  targets = targets.at[0, 3].set(next_token.IGNORE_INDEX).at[2, -1].set(next_token.IGNORE_INDEX)
  mask = jax.random.bernoulli(k4, 0.7, (B, T))
  return h, w, targets, mask


def _dense(h, w, targets, mask):
  return next_token.cross_entropy(h @ w, targets, mask)


def _chunked_sums(h, w, targets, mask, chunk, token_bytes=None):
  return next_token.loss_sums(next_token.head_token_losses(lambda x: x @ w, h, targets, mask, chunk), token_bytes)


def _chunked(h, w, targets, mask, chunk):
  sums = _chunked_sums(h, w, targets, mask, chunk)
  return sums.loss_sum, sums.num_tokens


@pytest.mark.parametrize("chunk", [4, 5, 12, 64])  # 4 and 12 divide T=12; 5 does not; 64 > T
def test_loss_and_gradients_equal_dense(chunk):
  h, w, targets, mask = _inputs()
  loss_fn = lambda f: lambda h, w: f(h, w)[0]
  dense_loss, dense_n = _dense(h, w, targets, mask)
  loss, n = _chunked(h, w, targets, mask, chunk)
  assert int(n) == int(dense_n) == int(next_token.valid_targets(targets, mask).sum())
  np.testing.assert_allclose(loss, dense_loss, rtol=1e-6)
  g_dense = jax.jit(jax.grad(loss_fn(lambda h, w: _dense(h, w, targets, mask)), argnums=(0, 1)))(h, w)
  g_chunk = jax.jit(jax.grad(loss_fn(lambda h, w: _chunked(h, w, targets, mask, chunk)),
                             argnums=(0, 1)))(h, w)
  for gd, gc in zip(g_dense, g_chunk):
    assert float(jnp.abs(gd).max()) > 1e-3  # the gradient is not trivially zero
    np.testing.assert_allclose(gc, gd, atol=1e-5, rtol=1e-5)
  # masked and ignored positions get no gradient
  dead = ~next_token.valid_targets(targets, mask)
  assert float(jnp.abs(g_chunk[0][dead]).max()) == 0.0


def test_all_sums_match_including_z_loss_and_bytes():
  h, w, targets, mask = _inputs(1)
  token_bytes = jnp.arange(V, dtype=jnp.int32) % 4 + 1
  dense = next_token.loss_sums(next_token.token_losses(h @ w, targets, mask), token_bytes)
  chunked = _chunked_sums(h, w, targets, mask, 5, token_bytes)
  for name in dense._fields:
    np.testing.assert_allclose(getattr(chunked, name), getattr(dense, name), rtol=1e-6, err_msg=name)
  z = lambda s: s.z_sum
  gd = jax.grad(lambda w: z(next_token.loss_sums(next_token.token_losses(h @ w, targets, mask))))(w)
  gc = jax.grad(lambda w: z(_chunked_sums(h, w, targets, mask, 5)))(w)
  np.testing.assert_allclose(gc, gd, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_model_head_fused_equals_full_model(tied):
  cfg = model_config(vocab_size=97, num_layers=2, num_heads=2, num_kv_heads=2, embed_dim=32,
                    mlp_dim=64, max_len=16, tie_embeddings=tied)
  model = Transformer(cfg)
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32),
           "loss_mask": jnp.asarray(rng.random((2, 16)) < 0.8),
           "segment_ids": jnp.ones((2, 16), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(16), (2, 16))}
  params = model.init(jax.random.key(0), batch["inputs"])["params"]
  assert ("lm_head" in params) != tied

  def loss(params, chunk):
    s = next_token.loss_sums(next_token.score(model, params, batch, chunk_size=chunk))
    return s.loss_sum, s
  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (l_dense, _), g_dense = grad_fn(params, 0)
  (l_chunk, _), g_chunk = grad_fn(params, 6)
  np.testing.assert_allclose(l_chunk, l_dense, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g_chunk, g_dense)


def _loss_and_grad_temp_bytes(chunk, tokens, vocab, dim):
  h = jax.ShapeDtypeStruct((1, tokens, dim), jnp.float32)
  w = jax.ShapeDtypeStruct((dim, vocab), jnp.float32)
  t = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
  if chunk:
    f = lambda h, w, t: _chunked(h, w, t, None, chunk)[0]
  else:
    f = lambda h, w, t: next_token.cross_entropy(h @ w, t)[0]
  compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(h, w, t).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_peak_memory_at_most_a_quarter_of_dense():
  dense = _loss_and_grad_temp_bytes(0, 2048, 8192, 32)
  chunked = _loss_and_grad_temp_bytes(256, 2048, 8192, 32)
  assert dense > 2048 * 8192 * 4  # at least one full float32 logits buffer
  assert chunked <= dense / 4, (chunked, dense)


@pytest.mark.slow
def test_train_and_eval_steps_with_chunked_loss_equal_dense():
  import optax

  from lmobjective import step

  cfg = model_config(vocab_size=61, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=16,
                    mlp_dim=32, max_len=10, tie_embeddings=False)
  model, tx = Transformer(cfg), optax.adamw(1e-2)
  rng = np.random.default_rng(1)
  targets = rng.integers(0, 61, (4, 10)).astype(np.int32)
  targets[1, :4] = next_token.IGNORE_INDEX
  batch = {"inputs": jnp.asarray(rng.integers(0, 61, (4, 10)), jnp.int32), "targets": jnp.asarray(targets),
           "loss_mask": jnp.asarray(rng.random((4, 10)) < 0.8), "segment_ids": jnp.ones((4, 10), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(10), (4, 10))}
  state = step.init_state(model, tx, jax.random.key(0), (2, 10))
  run = lambda chunk: jax.jit(functools.partial(step.train_step, model=model, tx=tx, grad_accum_steps=2,
                                                objective=next_token.NextToken(z_loss=1e-3, loss_chunk_size=chunk)))(
      state, batch)
  (dense_state, dense_m), (chunk_state, chunk_m) = run(0), run(3)  # 3 does not divide T=10
  for k in ("loss", "z_sum", "correct_sum", "num_tokens", "grad_norm"):
    np.testing.assert_allclose(chunk_m[k], dense_m[k], rtol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), chunk_state.params, dense_state.params)
  ev = lambda chunk: step.eval_step(state.params, batch, model=model,
                                    objective=next_token.NextToken(loss_chunk_size=chunk))
  np.testing.assert_allclose(ev(4).loss_sum, ev(0).loss_sum, rtol=1e-6)


def test_sequence_log_probs_chunked_equal_dense_and_float64():
  """Per-sequence sums of log p over a response mask (what preference objectives score), chunked
  or not, equal a float64 log-softmax; prompt positions and ignored targets never count."""
  h, w, targets, mask = _inputs(2)
  response = jnp.zeros((B, T), bool).at[:, T // 2:].set(True)  # second half of each row
  logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  t = np.asarray(targets)
  keep = (t >= 0) & np.asarray(mask) & np.asarray(response)
  ref = np.where(keep, np.take_along_axis(logp, np.where(t >= 0, t, 0)[..., None], -1)[..., 0], 0).sum(-1)
  for chunk in (0, 5):
    got, n = next_token.sequence_sums(next_token.head_token_losses(lambda x: x @ w, h, targets, mask, chunk), response)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-5, err_msg=f"chunk={chunk}")
    np.testing.assert_array_equal(np.asarray(n), keep.sum(-1))
