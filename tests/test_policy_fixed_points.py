"""Where policy.py's losses lead: exact expected gradients by enumeration, iterated to their fixed points.

float64 throughout (`jax.enable_x64` as a module fixture, undone when the module ends). A softmax-table
policy; a group is G responses drawn from π, and every group is enumerated and weighted by its
probability Π_i π(y_i) with π held fixed (every implementation differentiates through log π only,
never through the sampling distribution). A group's value is `policy_loss(...).loss_sum /
denominator`, its rows' advantages from `policy.advantages`, old = stop_gradient(logp) (ρ = 1); the
expected gradient is Σ_groups w·∇value, and θ ← θ − lr·E[∇] is iterated (jit, lax.fori_loop) until
the KL to the predicted fixed point is below 1e-10. The theory is docs/objectives.md's and the notes'
"Reward maximisation: fixed points and the traps that shipped"; the identities these rest on are in
tests/test_policy.py. Figures asserted here are stated in each test's docstring.
"""

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import brentq

from lmobjective.objectives import policy


@pytest.fixture(scope="module", autouse=True)
def x64():
  """float64 for this module's tests only: the context is entered before the first and left after
  the last, so nothing leaks into other modules of the same pytest process."""
  with jax.enable_x64(True):
    assert jnp.zeros(()).dtype == jnp.float64
    yield
  assert jnp.zeros(()).dtype == jnp.float32


def kl(p, q):
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  return float(np.sum(p * (np.log(p) - np.log(q))))


def softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


# ---------------------------------------------------------------------------- the bandit

K, G, BETA = 4, 3, 0.5
THETA_REF = np.array([0.4, -0.3, 0.9, -0.8])  # π_ref ≈ (0.29, 0.14, 0.48, 0.09): non-uniform
PI_REF = softmax(THETA_REF)
REWARD = np.array([1.0, 0.3, -0.5, 0.6])  # distinct; the best response is not the reference's favourite
PI_STAR = softmax(np.log(PI_REF) + REWARD / BETA)  # π* ∝ π_ref·exp(r/β)


class Setup(NamedTuple):
  """One way to train: the advantages (None: A is the penalised reward itself, no baseline), where
  the KL goes and which estimator, β, the group size, and whether there is a reward at all."""
  kind: str | None
  scale: str = "group"
  placement: str = "reward"
  estimator: str = "k1"
  beta: float = BETA
  G: int = G
  reward: bool = True


def _loss_value(logp_BxT, ref_BxT, reward_B, s: Setup):
  """loss_sum / denominator of one group (B = G rows), through policy.py only."""
  old = jax.lax.stop_gradient(logp_BxT)
  mask = jnp.ones(logp_BxT.shape, bool)
  score = reward_B
  if s.placement == "reward":  # the penalty, detached (old), joins the score before the baseline
    kl_B = (policy.sequence_k1(old, ref_BxT, mask) if s.estimator == "k1"
            else policy.kl_estimate(old, ref_BxT, s.estimator).sum(axis=-1))
    score = score - s.beta * kl_B
  A = score if s.kind is None else policy.advantages(score[None], s.kind, s.scale)[0]
  cfg = policy.LossConfig(beta=s.beta, kl_placement=s.placement, kl_estimator=s.estimator,
                          max_new_tokens=logp_BxT.shape[1])
  sums = policy.policy_loss(logp_BxT, old, A, mask, ref_BxT, cfg)
  return sums.loss_sum / policy.denominator(sums, cfg)


@functools.partial(jax.jit, static_argnums=1)
def bandit_expected_grad(theta_K, s: Setup):
  """E over all K^G groups of ∇_θ (loss_sum/denominator), one-token responses."""
  groups = np.array(list(itertools.product(range(K), repeat=s.G)))  # [K^G, G]
  log_ref, reward = jnp.asarray(np.log(PI_REF)), jnp.asarray(REWARD if s.reward else np.zeros(K))

  def surrogate(theta):
    logpi = jax.nn.log_softmax(theta)
    w = jax.lax.stop_gradient(jnp.exp(logpi[groups].sum(axis=-1)))
    values = jax.vmap(lambda g: _loss_value(logpi[g][:, None], log_ref[g][:, None], reward[g], s))(groups)
    return (w * values).sum()
  return jax.grad(surrogate)(theta_K)


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def descend(grad_fn, s, theta, steps, lr):
  return jax.lax.fori_loop(0, steps, lambda _, th: jax.tree.map(lambda t, g: t - lr * g, th, grad_fn(th, s)), theta)


def bandit_fixed_point(s: Setup, steps=2000, lr=2.0):
  """π after `steps` expected updates from π_ref, and the expected gradient's size there."""
  theta = descend(bandit_expected_grad, s, jnp.asarray(THETA_REF), steps, lr)
  return softmax(np.asarray(theta)), float(jnp.abs(bandit_expected_grad(theta, s)).max())


def k3_fixed_point(beta):
  """π(y) = β·π_ref(y)/(λ − r_y), λ > max r the root of Σ_y π(y) = 1: the stationary point of
  E_π[r] − β·KL(π_ref‖π)."""
  lam = brentq(lambda l: np.sum(beta * PI_REF / (l - REWARD)) - 1, REWARD.max() + 1e-12, REWARD.max() + beta,
              xtol=1e-15)
  pi = beta * PI_REF / (lam - REWARD)
  assert abs(pi.sum() - 1) < 1e-13
  return pi


@pytest.mark.parametrize("kind", ["rloo", "reinforce"])
def test_k1_in_the_reward_reaches_pi_star(kind):
  """RLOO (leave-one-out: unbiased) or REINFORCE (a batch of N = G: the mean that includes the sample
  scales reward and penalty alike by (N−1)/N) with −β·k1 in the reward → π* ∝ π_ref·exp(r/β)."""
  pi, grad = bandit_fixed_point(Setup(kind))
  assert kl(PI_STAR, pi) < 1e-10, (kl(PI_STAR, pi), pi, PI_STAR)
  assert grad < 1e-10
  assert kl(PI_STAR, PI_REF) > 0.3  # π* is far from where the descent started


def test_grpo_unscaled_with_k3_in_the_loss_reaches_the_forward_kl_point_at_beta_prime():
  """GRPO, scale_rewards none, k3 in the loss: E[∇] = −(G−1)/G·∇E_π[r] + β·∇KL(π_ref‖π), so
  π(y) = β′·π_ref(y)/(λ − r_y), β′ = β·G/(G−1) = 0.75. Not π*: KL(π*‖π) = 0.0763 (asserted > 0.05)."""
  target = k3_fixed_point(BETA * G / (G - 1))
  pi, grad = bandit_fixed_point(Setup("grpo", "none", "loss", "k3"))
  assert kl(target, pi) < 1e-10, (kl(target, pi), pi, target)
  assert grad < 1e-10
  gap = kl(PI_STAR, target)
  print(f"KL(pi* || grpo-none-k3 fixed point) = {gap:.6g}")
  assert gap > 0.05


def test_grpo_group_scaled_with_k3_in_the_loss_has_its_own_fixed_point():
  """GRPO, scale_rewards group (÷ the group's std + 1e-4), k3 in the loss: no closed form; the
  enumerated expected gradient vanishes (< 1e-10) at a point that is neither π* (KL(π*‖π) = 0.0784)
  nor the unscaled one (KL(that‖π) = 0.0411), both asserted > 0.02: the std rescales r per group."""
  pi, grad = bandit_fixed_point(Setup("grpo", "group", "loss", "k3"))
  assert grad < 1e-10
  unscaled = k3_fixed_point(BETA * G / (G - 1))
  print(f"KL(pi* || grpo-group) = {kl(PI_STAR, pi):.6g}, KL(grpo-none || grpo-group) = {kl(unscaled, pi):.6g}")
  assert kl(PI_STAR, pi) > 0.02 and kl(unscaled, pi) > 0.02


def test_reinforce_with_k2_in_the_loss_reaches_pi_star_at_beta_n_over_n_minus_1():
  """REINFORCE over a batch of N = G = 3, k2 in the loss: E[∇] = −(N−1)/N·∇E_π[r] + β·∇KL(π‖π_ref),
  so π ∝ π_ref·exp(r·(N−1)/(N·β)) (π* at β·N/(N−1)); KL(π*‖that) = 0.0435, asserted > 0.01."""
  N = G
  target = softmax(np.log(PI_REF) + REWARD * (N - 1) / (N * BETA))
  pi, grad = bandit_fixed_point(Setup("reinforce", placement="loss", estimator="k2"))
  assert kl(target, pi) < 1e-10, (kl(target, pi), pi, target)
  assert grad < 1e-10
  assert kl(PI_STAR, target) > 0.01


# ---------------------------------------------------------------------------- estimator × placement

def test_each_estimator_and_placement_has_its_expected_gradient_and_the_refused_ones_are_refused():
  """One draw (G = 1), no reward, no baseline, at a random interior π, β = 0.5:
  k1-loss → 0 (E_π[∇log π] = 0); k2-loss → β∇KL(π‖π_ref); k3-loss → β∇KL(π_ref‖π);
  k1-reward → β∇KL(π‖π_ref); k2-reward → β·Σ_y π·½log²(π/π_ref)·∇log π (no KL's gradient);
  k3-reward → β·[∇KL(π‖π_ref) − ∇KL(π_ref‖π)]; k2_sequence-loss at T = 1 is k2-loss. The pairs whose
  gradient is neither KL's are exactly policy.REFUSED's (k2_sequence in the reward is k2 there)."""
  theta = jnp.asarray(np.random.default_rng(0).normal(0, 1, K))
  log_ref = jnp.asarray(np.log(PI_REF))
  reverse = jax.grad(lambda t: policy.full_kl(jax.nn.log_softmax(t), log_ref))(theta)
  forward = jax.grad(lambda t: policy.full_kl(log_ref, jax.nn.log_softmax(t)))(theta)
  pi, d = np.asarray(jax.nn.softmax(theta)), np.asarray(jax.nn.log_softmax(theta) - log_ref)
  jac = np.asarray(jax.jacobian(jax.nn.log_softmax)(theta))  # [y, θ] = ∇_θ log π(y)
  k2_score = np.einsum("y,y,yk->k", pi, 0.5 * d ** 2, jac)
  want = {("loss", "k1"): 0 * reverse, ("loss", "k2"): BETA * reverse, ("loss", "k3"): BETA * forward,
          ("loss", "k2_sequence"): BETA * reverse, ("reward", "k1"): BETA * reverse,
          ("reward", "k2"): BETA * k2_score, ("reward", "k3"): BETA * (reverse - forward)}
  kept = set()
  for (placement, estimator), g in want.items():
    got = bandit_expected_grad(theta, Setup(None, placement=placement, estimator=estimator, G=1, reward=False))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), np.asarray(g), rtol=1e-12, atol=1e-14, err_msg=(placement, estimator))
    if any(np.linalg.norm(got - BETA * kl_grad) < 1e-12 for kl_grad in (reverse, forward)):
      kept.add((placement, estimator))
  assert np.linalg.norm(reverse) > 0.1 and np.linalg.norm(forward) > 0.1
  assert np.linalg.norm(k2_score - reverse) > 0.1 * np.linalg.norm(reverse)  # k2-reward: no KL's gradient
  assert np.linalg.norm(k2_score - forward) > 0.1 * np.linalg.norm(forward)
  assert kept == {("loss", "k2"), ("loss", "k3"), ("loss", "k2_sequence"), ("reward", "k1")}
  refused = set(want) - kept | {("reward", "k2_sequence")}
  assert refused == set(policy.REFUSED)
  for placement in policy.KL_PLACEMENTS:
    for estimator in policy.KL_ESTIMATORS:
      why = policy.refused(placement, estimator)
      assert why == policy.REFUSED.get((placement, estimator))
      assert (why is None) == ((placement, estimator) not in refused)
      assert why is None or (estimator in why and len(why) > 40)


# ---------------------------------------------------------------------------- two tokens

V = 3
TWO_THETA_REF = (np.array([0.5, -0.4, 0.1]), np.array([[0.8, -0.6, 0.0], [-0.3, 0.9, -0.5], [0.2, 0.2, -1.0]]))
TWO_REWARD = np.array([[1.2, -0.8, 0.2], [0.4, 0.5, 0.3], [-0.6, 1.5, -1.0]])  # r(y1, y2)
SEQS = np.array(list(itertools.product(range(V), repeat=2)))  # the 9 responses (y1, y2)


def _token_logps(theta, seqs_Nx2):
  """[N,2] log π(y1), log π(y2|y1) of a policy π(y1) = softmax(θ1), π(y2|y1) = softmax(θ2[y1])."""
  l1, l2 = jax.nn.log_softmax(theta[0]), jax.nn.log_softmax(theta[1], axis=-1)
  return jnp.stack([l1[seqs_Nx2[:, 0]], l2[seqs_Nx2[:, 0], seqs_Nx2[:, 1]]], axis=-1)


def sequence_probs(theta):
  return np.exp(np.asarray(_token_logps(tuple(jnp.asarray(t) for t in theta), SEQS)).sum(-1))


TWO_PI_REF = sequence_probs(TWO_THETA_REF)
TWO_PI_STAR = TWO_PI_REF * np.exp(TWO_REWARD.ravel() / BETA) / np.sum(TWO_PI_REF * np.exp(TWO_REWARD.ravel() / BETA))


@functools.partial(jax.jit, static_argnums=1)
def two_token_expected_grad(theta, s: Setup):
  """E over all 9^G groups (responses of T = 2 tokens, both scored) of ∇_θ (loss_sum/denominator)."""
  groups = np.array(list(itertools.product(range(len(SEQS)), repeat=s.G)))  # [9^G, G] response ids
  ref = _token_logps(tuple(jnp.asarray(t) for t in TWO_THETA_REF), SEQS)
  reward = jnp.asarray(TWO_REWARD.ravel())

  def surrogate(th):
    logp = _token_logps(th, SEQS)  # [9, 2]
    w = jax.lax.stop_gradient(jnp.exp(logp.sum(-1)[groups].sum(-1)))
    values = jax.vmap(lambda g: _loss_value(logp[g], ref[g], reward[g], s))(groups)
    return (w * values).sum()
  return jax.grad(surrogate)(theta)


def two_token_fixed_point(s: Setup, steps=6000, lr=12.0):
  theta = descend(two_token_expected_grad, s, tuple(jnp.asarray(t) for t in TWO_THETA_REF), steps, lr)
  grad = max(float(jnp.abs(g).max()) for g in two_token_expected_grad(theta, s))
  return sequence_probs(theta), grad


@pytest.mark.parametrize("placement,estimator", [("reward", "k1"), ("loss", "k2_sequence")])
def test_two_tokens_sequence_kl_reaches_pi_star(placement, estimator):
  """RLOO, G = 2 (81 groups): −β·Σ_t k1 in the reward (`sequence_k1`) or β·½(Σ_t log π/π_ref)² in
  the loss (`k2_sequence`) → π*(y1,y2) ∝ π_ref(y1,y2)·exp(r(y1,y2)/β) over the 9 responses."""
  pi, grad = two_token_fixed_point(Setup("rloo", placement=placement, estimator=estimator, G=2))
  assert kl(TWO_PI_STAR, pi) < 1e-10, (kl(TWO_PI_STAR, pi), pi, TWO_PI_STAR)
  assert grad < 1e-10
  assert kl(TWO_PI_STAR, TWO_PI_REF) > 0.3


def test_two_tokens_per_token_k2_in_the_loss_stops_short_of_pi_star():
  """Per-token k2 in the loss ignores how y1 changes the KL of y2's token: its fixed point keeps
  π*(y2|y1) but puts π(y1) ∝ π_ref(y1)·exp(E_{π*(·|y1)}[r]/β) instead of π_ref(y1)·Z(y1),
  Z(y1) = Σ_y2 π_ref(y2|y1)·exp(r/β). Asserted to 1e-10; KL(π*‖π) there = 0.0278 (asserted > 1e-2)."""
  pi, grad = two_token_fixed_point(Setup("rloo", placement="loss", estimator="k2", G=2))
  assert grad < 1e-10
  ref1, ref2 = softmax(TWO_THETA_REF[0]), np.stack([softmax(row) for row in TWO_THETA_REF[1]])
  star2 = ref2 * np.exp(TWO_REWARD / BETA)
  star2 /= star2.sum(-1, keepdims=True)
  first = softmax(np.log(ref1) + (star2 * TWO_REWARD).sum(-1) / BETA)
  predicted = (first[:, None] * star2).ravel()
  assert kl(predicted, pi) < 1e-10, (kl(predicted, pi), pi, predicted)
  gap = kl(TWO_PI_STAR, pi)
  print(f"KL(pi* || per-token-k2 fixed point) = {gap:.6g}")
  assert gap > 1e-2
