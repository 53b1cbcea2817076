"""Tiny stage runs shared by the objective-stack tests: pair files with a known optimum and configs."""

import json
import os

import ml_collections
import numpy as np

from _tiny import ROOT, tiny_config

_DEFAULT = os.path.join(ROOT, "configs", "default.py")


def source(kind: str, path: str, **fields) -> ml_collections.ConfigDict:
  """configs/default.py's `source(kind, 1.0, path=...)` with `fields` (every declared key present)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("lmobjective_default_for_tests", _DEFAULT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.source(kind, 1.0, path=str(path), **fields)


def stage_config(cache_dir, kind: str, path: str, source_fields=None, **overrides):
  """`tiny_config` with one source `kind` at `path` (named after the kind) and dotted overrides."""
  c = tiny_config(cache_dir)
  c.data.sources = ml_collections.ConfigDict()
  c.data.sources[kind.split("_")[0]] = source(kind, path, **(source_fields or {}))
  from _tiny import set_key
  for key, value in overrides.items():
    set_key(c, key, value)
  return c


# Bradley–Terry rewards of one-character responses, per one-character prompt: K = 2 and K = 4.
REWARDS = {"x": {"a": 0.0, "b": 0.7}, "y": {"a": 0.0, "b": 0.8, "c": -0.5, "d": 1.3}}


def bradley_terry_pairs(path: str, pairs_per_prompt: int, seed: int = 0) -> dict:
  """Writes pairs sampled from Bradley–Terry on REWARDS (a uniform pair of distinct candidates,
  the winner with probability σ(r_i − r_j)); returns the win counts {prompt: [K, K] wins[i, j]}."""
  rng = np.random.default_rng(seed)
  wins = {p: np.zeros((len(r), len(r)), np.int64) for p, r in REWARDS.items()}
  with open(path, "w") as f:
    for n in range(pairs_per_prompt):
      for p, r in REWARDS.items():
        cands = list(r)
        i, j = rng.choice(len(cands), 2, replace=False)
        if rng.random() >= 1.0 / (1.0 + np.exp(-(r[cands[i]] - r[cands[j]]))):
          i, j = j, i
        wins[p][i, j] += 1
        f.write(json.dumps({"prompt": p, "chosen": cands[i], "rejected": cands[j]}) + "\n")
  return wins


def candidates_text(path: str, lines: int = 2000, seed: int = 0) -> None:
  """Pretraining text over the same characters: a prompt and a uniformly drawn candidate per line."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for n in range(lines):
      p = "xy"[n % 2]
      f.write(p + list(REWARDS[p])[rng.integers(len(REWARDS[p]))] + "\n")


def bradley_terry_fit(wins_KxK: np.ndarray, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
  """Maximum-likelihood rewards (r_0 = 0) of win counts by Newton's method, float64, and their
  covariance [K, K] (the inverse Fisher information at the fit; row and column 0 are 0)."""
  K = len(wins_KxK)
  r = np.zeros(K)
  n_KxK = wins_KxK + wins_KxK.T
  for _ in range(iters):
    p = 1.0 / (1.0 + np.exp(-(r[:, None] - r[None, :])))
    grad = (wins_KxK - n_KxK * p).sum(1)
    w = n_KxK * p * (1 - p)
    hess = np.diag(w.sum(1)) - w  # of the negative log-likelihood
    step = np.linalg.solve(hess[1:, 1:], grad[1:])
    r[1:] += step
    if np.abs(step).max() < 1e-13:
      break
  cov = np.zeros((K, K))
  cov[1:, 1:] = np.linalg.inv(hess[1:, 1:])
  return r, cov
