"""The accelerator paths: cuDNN attention against XLA's, and a bfloat16 training step against float32.

`experiments/gpu_check.sh` runs this file first on a GPU machine. The cuDNN test needs a GPU (it is
skipped elsewhere); the bf16 test runs on any backend, so the suite keeps it honest on CPU too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmobjective.model import Transformer
from lmobjective.objectives import next_token
from tests._tiny import model_config

ON_GPU = jax.default_backend() == "gpu"
B, T, V = 4, 128, 512


def _tokens(seed: int = 0):
  return jax.random.randint(jax.random.key(seed), (B, T + 1), 0, V)


def _model(**fields):
  cfg = model_config(vocab_size=V, max_len=T, num_layers=2, num_heads=4, embed_dim=256, **fields)
  return Transformer(cfg)


def _loss_and_grads(model, params, tokens_BxT1):
  """The training loss (`next_token.score`, token-weighted mean) and its gradient."""
  inputs_BxT = tokens_BxT1[:, :-1]
  batch = {"inputs": inputs_BxT, "targets": tokens_BxT1[:, 1:], "positions": jnp.broadcast_to(jnp.arange(T), (B, T)),
           "segment_ids": jnp.ones_like(inputs_BxT)}

  def loss_fn(p):
    sums = next_token.loss_sums(next_token.score(model, p, batch))
    return sums.loss_sum / sums.num_tokens
  return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs a GPU")
def test_cudnn_attention_equals_xla_attention():
  tokens = _tokens()
  xla, cudnn = _model(attention="xla", compute_dtype="bfloat16"), _model(attention="cudnn", compute_dtype="bfloat16")
  params = xla.init(jax.random.key(1), tokens[:, :-1])["params"]
  got = np.asarray(cudnn.apply({"params": params}, tokens[:, :-1]), np.float32)
  want = np.asarray(xla.apply({"params": params}, tokens[:, :-1]), np.float32)
  # both compute in bf16 (8 bits of mantissa): compare at bf16's resolution of the logits' scale
  assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
  (loss_c, grads_c), (loss_x, grads_x) = _loss_and_grads(cudnn, params, tokens), _loss_and_grads(xla, params, tokens)
  assert abs(float(loss_c) - float(loss_x)) < 1e-2
  for gc, gx in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_x)):
    gc, gx = np.asarray(gc, np.float64).ravel(), np.asarray(gx, np.float64).ravel()
    assert gc @ gx / (np.linalg.norm(gc) * np.linalg.norm(gx) + 1e-30) > 0.99


def test_bf16_step_is_close_to_float32():
  tokens = _tokens()
  f32, bf16 = _model(compute_dtype="float32", attention="xla"), _model(compute_dtype="bfloat16", attention="xla")
  params = f32.init(jax.random.key(1), tokens[:, :-1])["params"]  # float32 weights for both (param_dtype)
  (loss32, grads32), (loss16, grads16) = _loss_and_grads(f32, params, tokens), _loss_and_grads(bf16, params, tokens)
  assert abs(float(loss16) - float(loss32)) < 2e-2 * float(loss32)
  assert abs(float(loss32) - np.log(V)) < 0.1  # at init the model is near uniform: the test scores a real model
  for g32, g16 in zip(jax.tree.leaves(grads32), jax.tree.leaves(grads16)):
    assert g16.dtype == jnp.float32  # gradients arrive in the weights' dtype
    g32, g16 = np.asarray(g32, np.float64).ravel(), np.asarray(g16, np.float64).ravel()
    assert g32 @ g16 / (np.linalg.norm(g32) * np.linalg.norm(g16) + 1e-30) > 0.98
