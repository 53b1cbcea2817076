"""Mixture regression: known laws are recovered from synthetic sweep results, and so is their optimum."""


import numpy as np
import pytest

from lmobjective.sweep import mixture_regression as mr

SOURCES = ["code", "prose", "markov"]
# The mixtures of experiments/mixture_ablation.py plus four more, as a sweep would measure them.
W = np.array([[.6, .3, .1], [1 / 3, 1 / 3, 1 / 3], [.8, .1, .1], [.1, .8, .1], [.1, .1, .8],
              [.45, .45, .1], [.45, .1, .45], [.1, .45, .45], [.2, .6, .2], [.6, .2, .2], [.2, .2, .6],
              [.3, .5, .2]])
EXP_LAW = {"code": {"c": 1.2, "t": [-0.6, 1.1, 0.9]}, "prose": {"c": 2.0, "t": [0.7, -1.4, 0.6]},
           "markov": {"c": 0.9, "t": [0.3, 0.4, -2.2]}}
LINEAR_LAW = {"code": [2.0, 3.5, 4.0], "prose": [5.0, 1.5, 3.0], "markov": [3.0, 2.8, 0.7]}


def brute_optimum(loss_fn, step=0.001):
  """The true optimum of the mean loss on a fine simplex grid (independent of mr.suggest)."""
  n = int(round(1 / step))
  a, b = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
  keep = a + b <= n
  grid = np.stack([a[keep], b[keep], n - a[keep] - b[keep]], 1) / n
  return grid[int(np.argmin(loss_fn(grid)))]


def test_linear_law_recovered_and_its_optimum_found():
  rng = np.random.default_rng(0)
  losses = {s: W @ np.array(b) * (1 + 0.002 * rng.standard_normal(len(W))) for s, b in LINEAR_LAW.items()}
  f = mr.fit(W, losses, SOURCES, law="linear")
  for s, b in LINEAR_LAW.items():
    np.testing.assert_allclose(f.params[s]["b"], b, rtol=0.05)
    assert f.r2[s] > 0.99 and f.loo_rmse[s] < 0.05
  w, pred = mr.suggest(f, "mean")
  true = brute_optimum(lambda g: np.mean([g @ np.array(b) for b in LINEAR_LAW.values()], 0))
  np.testing.assert_allclose(w, true, atol=0.02)
  np.testing.assert_allclose(true, [0, 0, 1])  # a vertex: the column means are 3.33, 2.60, 2.57


def test_exp_law_recovered_and_interior_optimum_found():
  rng = np.random.default_rng(1)
  truth = mr.Fit("exp", SOURCES, EXP_LAW, {}, {})
  losses = {s: v * (1 + 0.001 * rng.standard_normal(len(W))) for s, v in truth.predict(W).items()}
  f = mr.fit(W, losses, SOURCES, law="exp")
  for s, p in EXP_LAW.items():
    assert f.params[s]["c"] == pytest.approx(p["c"], rel=0.05)
    np.testing.assert_allclose(f.params[s]["t"], p["t"], rtol=0.05)
    assert f.r2[s] > 0.999
  w, pred = mr.suggest(f, "mean")
  true = brute_optimum(lambda g: np.mean(list(truth.predict(g).values()), 0))
  assert 0.1 < true.min()  # interior: every source is worth some share
  np.testing.assert_allclose(w, true, atol=0.02)
  assert pred == pytest.approx(np.mean([v[0] for v in truth.predict(true[None]).values()]), abs=0.01)


def test_single_source_target_and_linear_misfit_of_a_curved_law():
  truth = mr.Fit("exp", SOURCES, EXP_LAW, {}, {})
  losses = truth.predict(W)
  w, _ = mr.suggest(mr.fit(W, losses, SOURCES, "exp"), "prose")
  np.testing.assert_allclose(w, [0, 1, 0], atol=0.02)  # prose loss alone: all prose
  lin = mr.fit(W, losses, SOURCES, "linear")
  exp = mr.fit(W, losses, SOURCES, "exp")
  assert all(lin.loo_rmse[s] > 10 * exp.loo_rmse[s] for s in SOURCES)  # the curvature is real signal
  with pytest.raises(ValueError, match="target"):
    mr.suggest(exp, "nope")


def test_min_weight_keeps_the_suggestion_inside_the_measured_region():
  losses = {s: W @ np.array(b) for s, b in LINEAR_LAW.items()}
  w, _ = mr.suggest(mr.fit(W, losses, SOURCES, "linear"), "mean", min_weight=0.1)
  np.testing.assert_allclose(w, [0.1, 0.1, 0.8], atol=1e-6)  # the markov vertex of the shrunk simplex
