"""PPO's per-token pieces (issue 27): rewards per token, GAE, whitening and the clipped value loss.

PPO with a critic scores a response token by token: the reward is −β·k1 at every response token
(the KL to the reference, in the reward: the placement whose fixed point is π* ∝ π_ref·exp(r/β))
plus the sequence's score at its last real token; a value V_t (the critic's estimate of the return
from the state before token t) turns rewards into advantages by GAE (Schulman et al. 2016):

    δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   R_t = A_t + V_t (the value target),

with V = 0 and A = 0 after the response's last real token, so padding never enters a return. The
value loss is PPO2's clipped one, ½·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²) per token.

Every function is pure, works on [B,T] arrays where `mask_BxT` marks the response's target positions
(contiguous, as the sampler lays them out), and keeps its dtype, so the float64 tests
(`tests/test_ppo.py`) run the same code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WHITEN_EPS = 1e-8  # TRL's masked_whiten


def last_position(mask_BxT: jax.Array) -> jax.Array:
  """[B] the index of each row's last response position (0 for a row without one)."""
  T = mask_BxT.shape[1]
  return jnp.where(mask_BxT.any(axis=1), T - 1 - jnp.argmax(mask_BxT[:, ::-1], axis=1), 0)


def token_rewards(scores_B: jax.Array, kl_BxT: jax.Array, mask_BxT: jax.Array, beta: float) -> jax.Array:
  """[B,T] per-token rewards: −β·kl_t on every response position, + the score on the last one (never
  on padding; a row without a response gets none)."""
  T = mask_BxT.shape[1]
  at_last_BxT = (jnp.arange(T)[None, :] == last_position(mask_BxT)[:, None]) & mask_BxT
  return jnp.where(mask_BxT, -beta * kl_BxT, 0) + jnp.where(at_last_BxT, scores_B[:, None], 0)


def gae(rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """(advantages [B,T], returns [B,T]) by a reverse scan over positions; 0 off the response."""
  mask = mask_BxT.astype(rewards_BxT.dtype)
  r_TxB, v_TxB, m_TxB = rewards_BxT.T * mask.T, values_BxT.T * mask.T, mask.T

  def back(carry, x):
    next_value_B, next_adv_B = carry
    r_B, v_B, m_B = x
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = (delta_B + gamma * lam * next_adv_B) * m_B
    return (v_B, adv_B), adv_B

  zero = jnp.zeros_like(r_TxB[0])
  _, adv_TxB = jax.lax.scan(back, (zero, zero), (r_TxB, v_TxB, m_TxB), reverse=True)
  adv_BxT = adv_TxB.T
  return adv_BxT, (adv_BxT + values_BxT) * mask


def whiten(x_BxT: jax.Array, mask_BxT: jax.Array, shift_mean: bool = True) -> jax.Array:
  """(x − mean)/√(var + 1e-8) over the masked entries (var unbiased, TRL's `masked_whiten`); with
  `shift_mean` False the mean is added back (TRL whitens rewards so). 0 off the mask."""
  m = mask_BxT.astype(x_BxT.dtype)
  n = m.sum()
  mean = (x_BxT * m).sum() / n
  var = (jnp.square(x_BxT - mean) * m).sum() / (n - 1)
  out = (x_BxT - mean) * jax.lax.rsqrt(var + WHITEN_EPS)
  return jnp.where(mask_BxT, out if shift_mean else out + mean, 0)


def value_loss(values_BxT: jax.Array, old_values_BxT: jax.Array, returns_BxT: jax.Array, mask_BxT: jax.Array,
               cliprange_value: float) -> tuple[jax.Array, jax.Array]:
  """(per-token clipped value loss [B,T], per-token 1 where the clipped branch is the larger [B,T]),
  0 off the mask. The caller aggregates them as the policy loss is (`loss_type`)."""
  clipped = old_values_BxT + jnp.clip(values_BxT - old_values_BxT, -cliprange_value, cliprange_value)
  unclipped_loss, clipped_loss = jnp.square(values_BxT - returns_BxT), jnp.square(clipped - returns_BxT)
  loss = 0.5 * jnp.maximum(unclipped_loss, clipped_loss)
  clipfrac = (clipped_loss > unclipped_loss).astype(values_BxT.dtype)
  return jnp.where(mask_BxT, loss, 0), jnp.where(mask_BxT, clipfrac, 0)
