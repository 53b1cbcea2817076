"""The sampled tier: the real RL loop reaches each objective's fixed point on the bandit
(`experiments/rl_fixed_points.py`, seed 0 of each run) within τ = a fifth of the KL between the
right fixed point and the nearest wrong one. docs/objectives.md records the noise floor over 5 seeds
that τ is stated against (1.2e-4, 8.5e-4, 4.0e-4 and 6.3e-5 (ppo) at most, against τ = 5.0e-3, 2.2e-3, 5.0e-3,
5.0e-3)."""

import importlib.util
import os

import pytest

from _tiny import ROOT

_spec = importlib.util.spec_from_file_location("rl_fixed_points", os.path.join(ROOT, "experiments", "rl_fixed_points.py"))
rl_fixed_points = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rl_fixed_points)


@pytest.mark.slow
@pytest.mark.parametrize("name, wrong", [("rloo", "pi*(b')"), ("grpo_k3", "fwd(b)"), ("rloo_2x2", "pi*(b')"),
                                         ("ppo", "pi*(b')")])
def test_the_loop_reaches_its_fixed_point_not_the_nearest_wrong_one(tmp_path_factory, name, wrong):
  workdir = str(tmp_path_factory.getbasetemp() / "rl_fixed_points")
  r = rl_fixed_points.run(name, 0, workdir)
  assert r["nearest_wrong"] == wrong
  tau = r["wrong_kl"] / 5
  assert r["kl"] < tau, r
  assert r["ref_kl"] > 100 * tau  # the run moved far: the reference itself is nowhere near the target
