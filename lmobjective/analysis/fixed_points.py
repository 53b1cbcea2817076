"""The closed-form fixed points of KL-regularised reward maximisation on one context (a bandit).

With responses y from a finite set, rewards r_y, the frozen reference π_ref and β > 0:

  reverse_kl_optimum   π* ∝ π_ref·exp(r/β): the maximiser of E_π[r] − β·KL(π‖π_ref), reached by k1
                       in the reward (RLOO, REINFORCE, PPO) and k2 in the loss; DPO's optimum too.
  forward_kl_point     π(y) = β·π_ref(y)/(λ − r_y), λ > max r set by Σπ = 1: the stationary point of
                       E_π[r] − β·KL(π_ref‖π), where k3 in the loss (GRPO) leads.

A group or batch mean that includes the sample scales the reward's gradient by (G−1)/G, which moves
the KL-in-the-loss fixed points to β·G/(G−1) (`tests/test_policy_fixed_points.py` enumerates it).
Everything is float64 NumPy over log-probabilities [V].
"""

from __future__ import annotations

import numpy as np


def kl(logp_V: np.ndarray, logq_V: np.ndarray) -> float:
  """KL(p‖q) in nats of two log-probability vectors (ids p gives no mass add nothing)."""
  logp_V, logq_V = np.asarray(logp_V, np.float64), np.asarray(logq_V, np.float64)
  p_V = np.exp(logp_V)
  keep = p_V > 0
  return float(np.sum(p_V[keep] * (logp_V[keep] - logq_V[keep])))


def _normalised(x_V: np.ndarray) -> np.ndarray:
  m = x_V.max()
  return x_V - (m + np.log(np.exp(x_V - m).sum()))


def reverse_kl_optimum(logp_ref_V: np.ndarray, r_V: np.ndarray, beta: float) -> np.ndarray:
  """log π* = log π_ref + r/β − log Z."""
  return _normalised(np.asarray(logp_ref_V, np.float64) + np.asarray(r_V, np.float64) / beta)


def forward_kl_point(logp_ref_V: np.ndarray, r_V: np.ndarray, beta: float, iters: int = 200) -> np.ndarray:
  """log π with π(y) = β·π_ref(y)/(λ − r_y), λ found by bisection on Σπ = 1 (Σπ falls as λ grows)."""
  p_ref_V, r_V = np.exp(np.asarray(logp_ref_V, np.float64)), np.asarray(r_V, np.float64)
  mass = lambda lam: float(np.sum(beta * p_ref_V / (lam - r_V)))
  lo, hi = r_V.max() + 1e-300, r_V.max() + beta * p_ref_V.sum() + 1.0
  lo = max(lo, np.nextafter(r_V.max(), np.inf))
  while mass(hi) > 1:
    hi = r_V.max() + 2 * (hi - r_V.max())
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if mass(mid) > 1 else (lo, mid)
  return _normalised(np.log(beta * p_ref_V / (hi - r_V)))
