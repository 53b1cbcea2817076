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


def two_token_responses(rlx, prompt, params: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Every response of at most two tokens the RL stage `rlx` (a `run.rollout.RL`) can sample after
  `prompt`: a stop id alone, or any other id followed by any id (a stop id ends it, any other leaves
  it truncated), S = |stop| + (V − |stop|)·V of them. Returns ({name: log π(response | prompt) [S]
  float64 for each params of `params`}, the rows [S, T] the loop scores them from, as
  `rollout.sample_responses` lays them out), so a sequence-level fixed point can be enumerated."""
  import dataclasses

  import jax
  import jax.numpy as jnp

  from lmobjective import sampling
  from lmobjective.data import prompts as prompts_lib
  from lmobjective.run import rollout
  cfg = rollout.sampling_config(rlx, prompt)
  V, stops = rlx.ms.model.cfg.vocab_size, set(cfg.stop_ids)
  ids = prompts_lib.render(prompt, rlx.tokenizer)
  go = [v for v in range(V) if v not in stops]
  first = np.array(sorted(stops) + [v for v in go for _ in range(V)])
  second = np.array([cfg.pad_id] * len(stops) + list(range(V)) * len(go))
  length = np.where(np.isin(first, list(stops)), 1, 2)
  tokens = np.stack([first, np.where(length == 2, second, cfg.pad_id)], 1).astype(np.int32)
  samples = sampling.Samples(tokens=tokens, response_mask=np.arange(2)[None, :] < length[:, None],
                             logps=np.zeros(tokens.shape, np.float32), truncated=(length == 2) & ~np.isin(second, list(stops)),
                             lengths=length.astype(np.int32))
  P = len(ids)
  rows = jax.device_get(sampling.response_batch(jnp.asarray(np.tile(ids, (len(first), 1)), jnp.int32),
                                                jnp.full(len(first), P, jnp.int32), jax.tree.map(jnp.asarray, samples),
                                                cfg.pad_id))
  T = rlx.config.data.context_length
  rows = {k: np.pad(np.asarray(v), ((0, 0), (0, T - v.shape[1])), constant_values=False if k == "loss_mask" else 0)
          for k, v in rows.items()}
  out = {}
  for name, p in params.items():
    step1 = np.asarray(rlx.sampler.next_logps(p, [ids], cfg), np.float64)[0]  # [V]
    step2 = np.asarray(rlx.sampler.next_logps(p, [ids + [v] for v in go], dataclasses.replace(cfg, max_new_tokens=1)),
                       np.float64)  # [len(go), V]
    logp = step1[first].copy()
    two = length == 2
    logp[two] += step2[np.searchsorted(go, first[two]), second[two]]
    out[name] = logp
  return out, rows
