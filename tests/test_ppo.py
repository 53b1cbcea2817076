"""PPO's per-token pieces against float64 NumPy written out here: per-token rewards (the score never on
padding), GAE (a reverse Python loop), its γ = λ = 1 zero-critic identity, whitening and the clipped
value loss with its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmobjective.objectives import ppo

# Rows of different lengths: response positions start after a prompt and end before padding.
MASK = np.array([[0, 0, 1, 1, 1, 0, 0],
                 [0, 1, 1, 1, 1, 1, 1],
                 [0, 0, 0, 1, 0, 0, 0],
                 [0, 0, 0, 0, 0, 0, 0]], bool)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  shape = MASK.shape
  return rng.normal(size=shape), rng.normal(size=shape), rng.normal(size=shape), rng.normal(size=shape[0])


def np_gae(r, v, mask, gamma, lam):
  """Reverse loop per row over its response positions; V and A are 0 past the last one."""
  adv = np.zeros_like(r)
  for b in range(r.shape[0]):
    idx = np.flatnonzero(mask[b])
    next_v = next_a = 0.0
    for t in idx[::-1]:
      delta = r[b, t] + gamma * next_v - v[b, t]
      next_a = delta + gamma * lam * next_a
      adv[b, t], next_v = next_a, v[b, t]
  return adv, np.where(mask, adv + v, 0.0)


def test_token_rewards_put_the_score_on_the_last_real_token_only():
  _, _, kl, scores = _data()
  with jax.enable_x64(True):
    got = np.asarray(ppo.token_rewards(jnp.asarray(scores), jnp.asarray(kl), jnp.asarray(MASK), 0.3))
  want = np.where(MASK, -0.3 * kl, 0.0)
  for b, t in ((0, 4), (1, 6), (2, 3)):
    want[b, t] += scores[b]
  np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
  assert not got[3].any() and not got[0, 5:].any()  # padding rows and positions get nothing


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.0, 0.5)])
def test_gae_equals_a_float64_reverse_loop(gamma, lam):
  r, v, _, _ = _data(1)
  with jax.enable_x64(True):
    adv, ret = ppo.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(MASK), gamma, lam)
  want_adv, want_ret = np_gae(r, v, MASK, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-12, atol=1e-14)


def test_gae_with_gamma_lambda_one_and_a_zero_critic_is_the_reward_to_go():
  r, _, _, _ = _data(2)
  with jax.enable_x64(True):
    adv, ret = ppo.gae(jnp.asarray(r), jnp.zeros(MASK.shape), jnp.asarray(MASK), 1.0, 1.0)
  to_go = np.where(MASK, np.cumsum((r * MASK)[:, ::-1], axis=1)[:, ::-1], 0.0)
  np.testing.assert_allclose(np.asarray(adv), to_go, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(np.asarray(ret), to_go, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_equals_float64_numpy_over_the_mask(shift_mean):
  x, _, _, _ = _data(3)
  with jax.enable_x64(True):
    got = np.asarray(ppo.whiten(jnp.asarray(x), jnp.asarray(MASK), shift_mean))
  vals = x[MASK]
  mean, var = vals.mean(), vals.var(ddof=1)
  want = (x - mean) / np.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
  np.testing.assert_allclose(got, np.where(MASK, want, 0.0), rtol=1e-12, atol=1e-14)


def test_clipped_value_loss_and_its_gradient_equal_float64_numpy():
  v, old, ret, _ = _data(4)
  eps = 0.2

  def np_loss(v):
    clipped = old + np.clip(v - old, -eps, eps)
    l1, l2 = (v - ret) ** 2, (clipped - ret) ** 2
    grad = np.where(l2 > l1, np.where(np.abs(v - old) < eps, clipped - ret, 0.0), v - ret)  # d(½max)/dv
    return np.where(MASK, 0.5 * np.maximum(l1, l2), 0.0), np.where(MASK, l2 > l1, False), np.where(MASK, grad, 0.0)

  with jax.enable_x64(True):
    f = lambda v: ppo.value_loss(v, jnp.asarray(old), jnp.asarray(ret), jnp.asarray(MASK), eps)
    (loss, clipfrac), grad = np.asarray(f(jnp.asarray(v))), jax.grad(lambda v: f(v)[0].sum())(jnp.asarray(v))
  want_loss, want_clip, want_grad = np_loss(v)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-12, atol=1e-14)
  np.testing.assert_array_equal(clipfrac.astype(bool), want_clip)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-12, atol=1e-14)
  assert want_clip.any() and (MASK & ~want_clip).any()  # both branches are exercised


def test_explained_variance_equals_float64_numpy_over_the_mask():
  v, ret, _, _ = _data(5)
  with jax.enable_x64(True):
    ev = lambda v, r: float(ppo.explained_variance(jnp.asarray(v), jnp.asarray(r), jnp.asarray(MASK)))
    got, perfect, mean_only = ev(v, ret), ev(ret, ret), ev(np.full(MASK.shape, ret[MASK].mean()), ret)
    constant = ev(v, np.where(MASK, 2.0, 7.0))  # returns that do not vary over the mask (padding ignored)
  want = 1 - np.var(ret[MASK] - v[MASK]) / np.var(ret[MASK])
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert want < 0 and perfect == 1.0 and abs(mean_only) < 1e-12 and np.isnan(constant)
