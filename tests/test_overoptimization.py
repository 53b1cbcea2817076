"""Best-of-n's exact KL against its bound and an exact enumeration, and Gao et al.'s fits recovering known
coefficients from noisy curves generated with them."""

import itertools

import numpy as np
import pytest

from lmobjective.analysis import overoptimization as oo


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
def test_distinct_equiprobable_samples_reach_the_bound(n):
  """1,000 distinct equiprobable candidates: within 1e-3 of log n − (n−1)/n, never above it."""
  scores = np.random.default_rng(0).normal(size=1000)
  kl, bound = oo.best_of_n_kl(scores, n), oo.best_of_n_kl_bound(n)
  assert kl <= bound + 1e-12 and bound - kl < 1e-3, (kl, bound)
  assert oo.best_of_n_kl(scores, 1) == 0.0


@pytest.mark.parametrize("n", [2, 4, 16, 64])
def test_five_tied_levels_give_the_level_formula_below_the_bound_and_log_5(n):
  """1,000 samples on five equally likely levels: KL = Σ_k q_k·log(5·q_k), q_k = (k/5)^n − ((k−1)/5)^n,
  below the no-tie bound and below log 5 (best-of-n can only pick among five outcomes)."""
  scores = np.repeat(np.arange(5), 200)
  q = (np.arange(1, 6) / 5) ** n - (np.arange(5) / 5) ** n
  want = float(np.sum(q[q > 0] * np.log(5 * q[q > 0])))
  kl = oo.best_of_n_kl(scores, n)
  np.testing.assert_allclose(kl, want, rtol=1e-12)
  assert kl < oo.best_of_n_kl_bound(n) and kl < np.log(5)


def _enumerated(p_K, r_K, g_K, n):
  """Best-of-n on a bandit by brute force: every ordered n-tuple of candidates, with its probability;
  the winner is the highest proxy score, a tie split evenly among the tied draws."""
  K = len(p_K)
  p_bon = np.zeros(K)
  for tup in itertools.product(range(K), repeat=n):
    prob = np.prod(p_K[list(tup)])
    best = max(r_K[i] for i in tup)
    winners = [i for i in tup if r_K[i] == best]
    for i in winners:
      p_bon[i] += prob / len(winners)
  keep = p_bon > 0
  return float(np.sum(p_bon[keep] * np.log(p_bon[keep] / p_K[keep]))), float(p_bon @ g_K)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_the_exact_kl_and_gold_mean_equal_an_enumeration_on_a_small_bandit(n):
  """Five candidates with unequal reference mass, two of them tied on the proxy: the level formula equals
  brute force over all 5^n draws (float64)."""
  p = np.array([0.4, 0.25, 0.15, 0.12, 0.08])
  proxy = np.array([0.3, 1.0, 1.0, -0.5, 2.0])
  gold = np.array([0.1, 0.9, 0.2, -1.0, -0.3])  # the proxy's favourite is bad on gold
  want_kl, want_gold = _enumerated(p, proxy, gold, n)
  np.testing.assert_allclose(oo.best_of_n_kl(proxy, n, weights_M=p), want_kl, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(oo.best_of_n_mean(proxy, gold, n, weights_M=p), want_gold, rtol=1e-12, atol=1e-15)


def test_bad_input_is_refused():
  with pytest.raises(ValueError, match="n=0"):
    oo.best_of_n_kl([1.0, 2.0], 0)
  with pytest.raises(ValueError, match="finite scores"):
    oo.best_of_n_kl([1.0, np.nan], 2)
  with pytest.raises(ValueError, match="summing to 1"):
    oo.best_of_n_kl([1.0, 2.0], 2, weights_M=[0.5, 0.6])
  with pytest.raises(ValueError, match="form='ppo'"):
    oo.fit_gao([0.1, 0.2, 0.3], [0, 0, 0], "ppo")
  with pytest.raises(ValueError, match="3 points with d > 0"):  # the origin and two more fit exactly
    oo.fit_gao([0.0, 1.0, 2.0], [0.0, 0.1, 0.15], "rl")


@pytest.mark.parametrize("form, alpha, beta", [("best_of_n", 1.2, 0.35), ("rl", 0.8, 0.4)])
def test_gao_fits_recover_the_coefficients_of_noisy_curves(form, alpha, beta):
  d = np.linspace(0.05, 4.0, 40)
  rng = np.random.default_rng(0)
  gold = oo.gao_curve(d, alpha, beta, form) + rng.normal(0, 0.01, d.shape)
  fit = oo.fit_gao(d, gold, form)
  assert abs(fit["alpha"] - alpha) < 0.02 and abs(fit["beta"] - beta) < 0.02, fit
  assert fit["rms"] < 0.015 and fit["r2"] > 0.99
  other = oo.fit_gao(d, gold, "rl" if form == "best_of_n" else "best_of_n")  # the wrong form fits worse
  assert other["rms"] > 2 * fit["rms"], (fit, other)


def test_the_best_of_n_curve_averages_exact_prompts():
  """Two prompts: the curve's KL and gold are the means of each prompt's own exact values."""
  proxy = np.array([[0.1, 0.5, 0.3, 0.9], [1.0, 1.0, 2.0, 0.0]])
  gold = np.array([[1.0, 0.0, 2.0, -1.0], [0.5, 0.1, 0.2, 0.3]])
  (n1, n3) = oo.best_of_n_curve(proxy, gold, [1, 3])
  assert n1["kl"] == 0.0 and n1["gold"] == pytest.approx(gold.mean())
  want_kl = np.mean([oo.best_of_n_kl(p, 3) for p in proxy])
  want_gold = np.mean([_enumerated(np.full(4, 0.25), p, g, 3)[1] for p, g in zip(proxy, gold)])
  assert n3["kl"] == pytest.approx(want_kl, rel=1e-12) and n3["d"] == pytest.approx(np.sqrt(want_kl))
  assert n3["gold"] == pytest.approx(want_gold, rel=1e-12)


def test_bradley_terry_labels_follow_the_gold_difference():
  """Over 200,000 draws the share preferring a is σ(Δ/τ) within 4 standard errors; τ = 0 is the argmax."""
  n, delta, tau = 200_000, 0.3, 0.5
  a_wins = oo.bradley_terry_labels(np.full(n, delta), np.zeros(n), tau, seed=0)
  p = 1 / (1 + np.exp(-delta / tau))
  assert abs(a_wins.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
  hard = oo.bradley_terry_labels(np.array([0.2, 0.1, 0.5]), np.array([0.1, 0.2, 0.5]), 0.0, seed=0)
  assert hard[:2].tolist() == [True, False]
