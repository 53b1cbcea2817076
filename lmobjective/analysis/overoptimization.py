"""Reward over-optimisation (Gao et al. 2022, "Scaling laws for reward model overoptimization"): the
exact KL of best-of-n sampling and the paper's functional forms of the gold reward against d = √KL.

Best-of-n draws n responses from the reference and keeps the one the proxy scores highest. Over m ≫ n
reference samples with weights w (1/m each by default) and proxy scores s, let the distinct score
levels be ℓ_1 < … < ℓ_L with reference mass p_ref(ℓ) and CDF F. The best of n lands on level ℓ with
probability p_bon(ℓ) = F(ℓ)^n − F(ℓ⁻)^n, and inside a level it picks as the reference does (ties are
broken uniformly), so

    KL(π_bon ‖ π_ref) = Σ_ℓ p_bon(ℓ)·log(p_bon(ℓ)/p_ref(ℓ))   (`best_of_n_kl`, exact),

whose familiar form log n − (n−1)/n is only the upper bound, reached when no two samples tie (then
the sum is the KL of the n-th power of a uniform variable: ∫ n·u^{n−1}·log(n·u^{n−1}) du). The
expected value of any other score under best-of-n (`best_of_n_mean`, e.g. the gold reward) weighs each
level's reference mean by p_bon(ℓ).

Gao et al.'s forms of the gold reward R as a function of d = √KL(π‖π_ref):

    best-of-n   R(d) = d·(α − β·d)
    RL          R(d) = d·(α − β·log d)

Both are linear in (α, β) for known d, so `fit_gao` is an ordinary least-squares fit of R on the
features (d, −d²) or (d, −d·log d), no intercept (R(0) = 0: the reference's own gold reward is the
origin; callers subtract it).
"""

from __future__ import annotations

import numpy as np

FORMS = ("best_of_n", "rl")


def _levels(scores_M: np.ndarray, weights_M: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(sorted distinct levels [L], reference mass of each [L], the level index of each sample [M])."""
  scores_M = np.asarray(scores_M, np.float64).reshape(-1)
  if not len(scores_M) or not np.isfinite(scores_M).all():
    raise ValueError(f"best-of-n needs finite scores of at least one sample (got {len(scores_M)})")
  w_M = np.full(len(scores_M), 1.0 / len(scores_M)) if weights_M is None else np.asarray(weights_M, np.float64)
  if w_M.shape != scores_M.shape or (w_M < 0).any() or not np.isclose(w_M.sum(), 1.0, rtol=1e-9, atol=1e-12):
    raise ValueError("best-of-n weights must be one non-negative number per sample, summing to 1")
  levels_L, index_M = np.unique(scores_M, return_inverse=True)
  return levels_L, np.bincount(index_M, weights=w_M, minlength=len(levels_L)), index_M


def best_of_n_probs(scores_M, n: int, weights_M=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(levels [L], p_ref [L], p_bon [L]) of the best of `n` reference samples, by proxy score level."""
  if n < 1:
    raise ValueError(f"n={n}: best-of-n needs n >= 1")
  levels_L, p_ref_L, _ = _levels(scores_M, weights_M)
  if n == 1:
    return levels_L, p_ref_L, p_ref_L.copy()  # the reference itself (the differences below round)
  cdf_L = np.minimum(np.cumsum(p_ref_L), 1.0)
  below_L = np.concatenate([[0.0], cdf_L[:-1]])
  return levels_L, p_ref_L, cdf_L**n - below_L**n


def best_of_n_kl(scores_M, n: int, weights_M=None) -> float:
  """KL(π_bon ‖ π_ref) in nats, exactly (module docstring), from the reference samples' proxy scores."""
  _, p_ref_L, p_bon_L = best_of_n_probs(scores_M, n, weights_M)
  keep = p_bon_L > 0
  return float(np.sum(p_bon_L[keep] * np.log(p_bon_L[keep] / p_ref_L[keep])))


def best_of_n_kl_bound(n: int) -> float:
  """log n − (n−1)/n: the KL when no two samples tie (the upper bound of `best_of_n_kl`)."""
  return float(np.log(n) - (n - 1) / n)


def best_of_n_mean(scores_M, values_M, n: int, weights_M=None) -> float:
  """E[value] of the best-of-`n` response: each level's reference-weighted mean value times p_bon."""
  levels_L, p_ref_L, index_M = _levels(scores_M, weights_M)
  _, _, p_bon_L = best_of_n_probs(scores_M, n, weights_M)
  w_M = np.full(len(index_M), 1.0 / len(index_M)) if weights_M is None else np.asarray(weights_M, np.float64)
  values_M = np.asarray(values_M, np.float64).reshape(-1)
  level_mean_L = np.bincount(index_M, weights=w_M * values_M, minlength=len(levels_L)) / np.where(p_ref_L > 0, p_ref_L, 1)
  return float(np.sum(p_bon_L * level_mean_L))


def _features(d: np.ndarray, form: str) -> np.ndarray:
  if form == "best_of_n":
    return np.stack([d, -d * d], axis=1)
  if form == "rl":
    return np.stack([d, -d * np.log(np.where(d > 0, d, 1.0))], axis=1)
  raise ValueError(f"form={form!r}: must be one of {', '.join(FORMS)}")


def gao_curve(d, alpha: float, beta: float, form: str) -> np.ndarray:
  """R(d) of Gao et al.'s `form` ("best_of_n": d(α − βd); "rl": d(α − β log d)), the shape of `d`."""
  d = np.asarray(d, np.float64)
  return (_features(d.reshape(-1), form) @ np.array([alpha, beta])).reshape(d.shape)


def fit_gao(d, gold, form: str) -> dict[str, float]:
  """Least-squares (α, β) of `gold` ≈ R(d) in `form`, and the fit's RMS residual and R².

  Both forms vanish at d = 0, so a point there says nothing about (α, β): at least 3 points with d > 0
  are needed, or two of them would fit exactly (RMS 0) whatever the curve between and beyond them."""
  d, gold = np.asarray(d, np.float64).reshape(-1), np.asarray(gold, np.float64).reshape(-1)
  if d.shape != gold.shape or (d < 0).any() or not (np.isfinite(d).all() and np.isfinite(gold).all()):
    raise ValueError("fit_gao needs finite points (d >= 0, one gold value each)")
  informative = int((d > 0).sum())
  if informative < 3:
    raise ValueError(f"fit_gao needs at least 3 points with d > 0 (got {informative}): both forms vanish at d = 0, "
                     "so two points fit exactly")
  X = _features(d, form)
  (alpha, beta), *_ = np.linalg.lstsq(X, gold, rcond=None)
  resid = gold - X @ np.array([alpha, beta])
  total = np.sum((gold - gold.mean()) ** 2)
  return {"alpha": float(alpha), "beta": float(beta), "rms": float(np.sqrt(np.mean(resid**2))),
          "r2": float(1 - np.sum(resid**2) / total) if total > 0 else float("nan")}


def best_of_n_curve(proxy_PxM, gold_PxM, ns) -> list[dict[str, float]]:
  """Best-of-n on P prompts with M reference samples each (proxy and gold scores [P, M]): per n, the mean
  over prompts of the exact KL (`best_of_n_kl`), of the proxy and of the gold reward of the response
  best-of-n keeps, and d = √KL (the KL of the joint over prompts is the mean of theirs)."""
  proxy_PxM, gold_PxM = np.asarray(proxy_PxM, np.float64), np.asarray(gold_PxM, np.float64)
  if proxy_PxM.shape != gold_PxM.shape or proxy_PxM.ndim != 2:
    raise ValueError(f"proxy {proxy_PxM.shape} and gold {gold_PxM.shape} must both be [prompts, samples]")
  out = []
  for n in ns:
    kl = float(np.mean([best_of_n_kl(p, n) for p in proxy_PxM]))
    out.append({"n": int(n), "kl": kl, "d": float(np.sqrt(kl)),
                "proxy": float(np.mean([best_of_n_mean(p, p, n) for p in proxy_PxM])),
                "gold": float(np.mean([best_of_n_mean(p, g, n) for p, g in zip(proxy_PxM, gold_PxM)]))})
  return out


def bradley_terry_labels(gold_a_N, gold_b_N, temperature: float, seed: int) -> np.ndarray:
  """bool [N]: whether response a is preferred to b, drawn from Bradley–Terry on the gold reward,
  P(a ≻ b) = σ((g_a − g_b)/temperature) (temperature 0: the higher gold, a tie broken by a fair coin)."""
  diff = np.asarray(gold_a_N, np.float64) - np.asarray(gold_b_N, np.float64)
  u = np.random.default_rng(seed).random(diff.shape)
  if temperature == 0:
    return np.where(diff == 0, u < 0.5, diff > 0)
  if temperature < 0:
    raise ValueError(f"temperature={temperature}: must be >= 0")
  return u < 1.0 / (1.0 + np.exp(-diff / temperature))
