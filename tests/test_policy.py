"""objectives/policy.py's identities: advantages, KL estimators and the clipped surrogate, in float32
against float64 NumPy written out here (not imported from the module), loss and gradient.

Inputs are drawn in float32 and the reference reads those same values in float64, so the only
difference is float32 arithmetic: everything holds to rtol 1e-6 of each quantity's scale (the atol
is 1e-6 × the largest |reference|, for entries near 0 and for sums with cancellation). The exact
fixed points that these identities lead to are in tests/test_policy_fixed_points.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmobjective.objectives import interface, policy

RTOL = 1e-6
STD_EPS = 1e-4  # GRPO's std + eps (TRL's value), written here independently of the module


def assert_close(got, want, rtol=RTOL, err_msg=""):
  want = np.asarray(want, np.float64)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol,
                             atol=rtol * max(np.abs(want).max(initial=0.0), 1e-30), err_msg=err_msg)


# ---------------------------------------------------------------------------- float64 references

def np_advantages(r_PxG, kind, scale_rewards="group"):
  """RLOO: R_i − mean of the other G−1 (a literal leave-one-out); REINFORCE: R − batch mean;
  GRPO: (R − group mean)/(std_ddof1 + 1e-4), std of the group, of the batch, or none."""
  r = np.asarray(r_PxG, np.float64)
  P, G = r.shape
  if kind == "rloo":
    return np.array([[r[p, i] - np.delete(r[p], i).mean() for i in range(G)] for p in range(P)])
  if kind == "reinforce":
    return r - r.mean()
  centred = r - r.mean(axis=1, keepdims=True)
  if scale_rewards == "none":
    return centred
  std = r.std(axis=1, ddof=1, keepdims=True) if scale_rewards == "group" else r.std(ddof=1)
  return centred / (std + STD_EPS)


def np_kl(logp, ref, estimator):
  """Schulman's k1 = log π/π_ref, k2 = ½ log²(π/π_ref), k3 = π_ref/π − 1 − log(π_ref/π)."""
  d = np.asarray(logp, np.float64) - np.asarray(ref, np.float64)
  return {"k1": d, "k2": 0.5 * d ** 2, "k3": np.exp(-d) - 1 + d}[estimator]


def np_policy_loss(logp, old, A, mask, ref, row_valid, cfg):
  """The reference's sums (a dict) and d loss_sum / d logp. Per token −min(ρA, clip(ρ)A); its
  gradient is −ρA where the unclipped term is the smaller (or they tie), 0 where the clipped one is.
  KL per row: Σ_t k2 (d/dlogp = log π/π_ref), Σ_t k3 (1 − π_ref/π) or ½(Σ_t log π/π_ref)²
  (k2_sequence: the sum at each token). Row weight 1/n (grpo) or 1; β times the KL with it in the loss."""
  logp, old, ref, A = (np.asarray(x, np.float64) for x in (logp, old, ref, A))
  hi = cfg.cliprange if cfg.cliprange_high is None else cfg.cliprange_high
  lr = np.where(mask, logp - old, 0.0)
  rho = np.exp(lr)
  unclipped = rho * A[:, None]
  clipped = np.clip(rho, 1 - cfg.cliprange, 1 + hi) * A[:, None]
  takes_clipped = mask & (clipped < unclipped)
  pg_tok = np.where(mask, -np.minimum(unclipped, clipped), 0.0)
  dpg_tok = np.where(mask & ~takes_clipped, -unclipped, 0.0)
  n = mask.sum(axis=1)
  w = 1 / np.maximum(n, 1) if cfg.loss_type == "grpo" else np.ones(len(n))
  d = np.where(mask, logp - ref, 0.0)
  if not cfg.kl_in_loss:
    kl_row, dkl_tok = np.zeros(len(n)), np.zeros_like(d)
  elif cfg.kl_estimator == "k2_sequence":
    s = d.sum(axis=1)
    kl_row, dkl_tok = 0.5 * s ** 2, np.where(mask, s[:, None], 0.0)
  elif cfg.kl_estimator == "k2":
    kl_row, dkl_tok = np.where(mask, 0.5 * d ** 2, 0).sum(1), d
  else:
    kl_row, dkl_tok = np.where(mask, np.exp(-d) - 1 + d, 0).sum(1), np.where(mask, 1 - np.exp(-d), 0.0)
  beta = cfg.beta if cfg.kl_in_loss else 0.0
  pg, kl = (w * pg_tok.sum(1)).sum(), (w * kl_row).sum()
  sequences = int(row_valid.sum())
  den = {"dapo": int(n.sum()), "grpo": sequences, "dr_grpo": sequences * cfg.max_new_tokens}[cfg.loss_type]
  sums = dict(loss_sum=pg + beta * kl, pg_sum=pg, kl_sum=kl, num_tokens=int(n.sum()), num_sequences=sequences,
              clipped_tokens=int(takes_clipped.sum()), ratio_sum=np.where(mask, rho, 0).sum(),
              approxkl_sum=0.5 * (lr ** 2).sum(), signal_sequences=int(((A != 0) & (n > 0) & row_valid).sum()))
  return sums, den, w[:, None] * (dpg_tok + beta * dkl_tok)


# ---------------------------------------------------------------------------- advantages

def _reward_table(seed, P=6, G=4):
  """[P,G] float32 rewards; row 2 is a group of equal rewards, row 4 has a tie of two."""
  rng = np.random.default_rng(seed)
  r = rng.normal(0.3, 1.0, (P, G)).astype(np.float32)
  if P > 4:
    r[2] = np.float32(0.7)
    r[4, 1] = r[4, 0]
  return r


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind,scale", [("rloo", "group"), ("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                        ("reinforce", "group")])
def test_advantages_match_float64_numpy(kind, scale, seed):
  r = _reward_table(seed)
  got = policy.advantages(jnp.asarray(r), kind, scale)
  assert got.dtype == jnp.float32 and got.shape == r.shape
  want = np_advantages(r, kind, scale)
  assert_close(got, want, err_msg=f"{kind} {scale}")
  if kind != "reinforce":  # the equal group: exactly 0 (not 0/0, not rounding)
    assert (np.asarray(got)[2] == 0).all(), np.asarray(got)[2]
  assert np.abs(want).max() > 0.3 and (want > 0).any() and (want < 0).any()


@pytest.mark.parametrize("G", [2, 3, 5, 6, 7, 8, 16])
@pytest.mark.parametrize("kind,scale", [("rloo", "group"), ("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                        ("reinforce", "group")])
def test_a_group_of_equal_rewards_has_advantage_exactly_zero(kind, scale, G):
  """In float32 too, for every group size and any value: a mean of G equal floats is not always the
  value (0.7 × 8 summed in order rounds), and GRPO divides that rounding by std + 1e-4 ≈ 1e-4."""
  values = np.random.default_rng(G).uniform(-3, 3, 64).astype(np.float32)
  values[0] = 0.7
  if kind == "reinforce":  # its baseline is the batch's mean: the whole batch equal, one value at a time
    a = np.stack([np.asarray(policy.advantages(jnp.full((3, G), v), kind, scale)) for v in values[:16]])
  else:
    a = np.asarray(policy.advantages(jnp.asarray(np.repeat(values[:, None], G, axis=1)), kind, scale))
  assert (a == 0).all(), (np.abs(a).max(), (a != 0).sum())


def test_rloo_and_reinforce_are_unbiased_and_biased_baselines():
  """RLOO's A_i = G/(G−1)·(R_i − group mean); REINFORCE over a one-prompt batch and GRPO 'none' are
  both R − mean: the (G−1)/G scale of the fixed-point tests."""
  r = _reward_table(3, P=1, G=5)
  G = r.shape[1]
  rloo, grpo = policy.advantages(jnp.asarray(r), "rloo"), policy.advantages(jnp.asarray(r), "grpo", "none")
  assert_close(rloo, G / (G - 1) * np_advantages(r, "grpo", "none"))
  assert_close(grpo, policy.advantages(jnp.asarray(r), "reinforce"))


# ---------------------------------------------------------------------------- KL estimators

@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimates_match_float64_numpy(estimator):
  rng = np.random.default_rng(7)
  logp = rng.normal(-2.0, 1.0, (5, 9)).astype(np.float32)
  ref = (logp + rng.normal(0, 0.8, logp.shape)).astype(np.float32)
  got = policy.kl_estimate(jnp.asarray(logp), jnp.asarray(ref), estimator)
  assert got.dtype == jnp.float32
  assert_close(got, np_kl(logp, ref, estimator), err_msg=estimator)
  if estimator != "k1":
    assert (np.asarray(got) >= 0).all()
  mask = rng.random(logp.shape) < 0.6
  assert_close(policy.sequence_k1(jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(mask)),
               np.where(mask, np_kl(logp, ref, "k1"), 0).sum(axis=1))


def test_full_kl_and_entropy_match_float64_numpy():
  """KL(π‖π_ref) = Σ_v π(v)·log(π/π_ref)(v) and H = −Σ_v π log π, a zero-mass id adding nothing."""
  rng = np.random.default_rng(8)
  logits = rng.normal(0, 1.5, (4, 11)).astype(np.float32)
  logits[0, 3] = -np.inf  # π gives id 3 no mass (and π_ref none either below): 0, not NaN
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
  ref_logits = rng.normal(0, 1.5, (4, 11)).astype(np.float32)
  ref_logits[0, 3] = -np.inf
  ref = np.asarray(jax.nn.log_softmax(jnp.asarray(ref_logits)))
  p = np.exp(logp.astype(np.float64))
  on = p > 0
  lp, lr = np.where(on, logp, 0.0), np.where(on, ref, 0.0)
  want_kl, want_h = (p * (lp - lr)).sum(-1), -(p * lp).sum(-1)
  assert_close(policy.full_kl(jnp.asarray(logp), jnp.asarray(ref)), want_kl)
  assert_close(policy.entropy(jnp.asarray(logp)), want_h)


# ---------------------------------------------------------------------------- the loss

def _rollout(seed, B=7, T=6):
  """float32 [B,T] log-probs with ragged masks (the last row is padding: no token, not valid),
  old ≠ logp (ratios about exp(±0.5), many outside the clip range), advantages of both signs, a
  zero one. Off the mask every field holds junk the loss must not read."""
  rng = np.random.default_rng(seed)
  lengths = np.array([T, 1, 4, T - 1, 3, 2, 0])[:B]
  mask = np.arange(T)[None, :] < lengths[:, None]
  logp = rng.normal(-2.0, 1.0, (B, T)).astype(np.float32)
  old = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
  ref = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
  A = rng.normal(0, 1.0, B).astype(np.float32)
  A[3] = 0.0
  assert (A[:-1] > 0).any() and (A[:-1] < 0).any()
  return logp, old, ref, A, mask, lengths > 0


KL_CASES = [(0.0, "reward", "k1"), (0.3, "reward", "k1"), (0.3, "loss", "k2"), (0.3, "loss", "k3"),
            (0.3, "loss", "k2_sequence")]


def _jax_sums_and_grad(logp, old, ref, A, mask, row_valid, cfg, den=None):
  """(sums, d loss_sum / d logp) or, given `den`, d (loss_sum/den) / d logp."""
  def f(lp):
    sums = policy.policy_loss(lp, jnp.asarray(old), jnp.asarray(A), jnp.asarray(mask), jnp.asarray(ref), cfg,
                              jnp.asarray(row_valid))
    return sums.loss_sum / (1 if den is None else den), sums
  return jax.grad(f, has_aux=True)(jnp.asarray(logp))[::-1]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta,placement,estimator", KL_CASES)
@pytest.mark.parametrize("loss_type", policy.LOSS_TYPES)
def test_policy_loss_and_gradient_match_float64_numpy(loss_type, beta, placement, estimator, seed):
  logp, old, ref, A, mask, row_valid = _rollout(seed)
  cfg = policy.LossConfig(beta=beta, kl_placement=placement, kl_estimator=estimator, loss_type=loss_type,
                          cliprange=0.2, cliprange_high=0.28, max_new_tokens=mask.shape[1])
  sums, grad = _jax_sums_and_grad(logp, old, ref, A, mask, row_valid, cfg)
  want, den, want_grad = np_policy_loss(logp, old, A, mask, ref, row_valid, cfg)
  assert sums.loss_sum.dtype == jnp.float32
  for field, value in want.items():
    if isinstance(value, int):
      assert int(getattr(sums, field)) == value, field
    else:
      assert_close(getattr(sums, field), value, err_msg=field)
  assert int(policy.denominator(sums, cfg)) == den
  assert np.isfinite(np.asarray(grad)).all()
  assert_close(grad, want_grad, err_msg="d loss_sum / d logp")
  assert (np.asarray(grad)[~mask] == 0).all()
  # the clip is exercised both ways: some tokens clipped (gradient 0), most not
  assert 0 < want["clipped_tokens"] < want["num_tokens"] // 2
  assert want["signal_sequences"] == row_valid.sum() - 1  # the zero advantage is no signal
  if cfg.kl_in_loss:
    assert want["kl_sum"] > 0.05
  else:
    assert float(sums.kl_sum) == 0


def test_the_clipped_tokens_are_the_ones_with_zero_gradient_and_both_signs_clip():
  """PPO's min takes clip(ρ)·A exactly where ρ > 1+ε_high with A > 0 or ρ < 1−ε with A < 0;
  there the surrogate is constant in log π (gradient 0); cliprange_high moves only the upper edge."""
  logp, old, ref, A, mask, row_valid = _rollout(3)
  cfg = policy.LossConfig(cliprange=0.2, cliprange_high=0.28)
  sums, grad = _jax_sums_and_grad(logp, old, ref, A, mask, row_valid, cfg)
  rho = np.exp(np.where(mask, logp.astype(np.float64) - old, 0))
  upper, lower = mask & (rho > 1.28) & (A[:, None] > 0), mask & (rho < 0.8) & (A[:, None] < 0)
  assert upper.any() and lower.any()
  assert int(sums.clipped_tokens) == (upper | lower).sum()
  assert (np.asarray(grad)[upper | lower] == 0).all()
  between = mask & (rho > 1.2) & (rho < 1.28) & (A[:, None] > 0)  # clipped at 1.2, not at 1.28
  symmetric, _ = _jax_sums_and_grad(logp, old, ref, A, mask, row_valid, policy.LossConfig(cliprange=0.2))
  assert between.any()
  assert int(symmetric.clipped_tokens) == int(sums.clipped_tokens) + between.sum()


@pytest.mark.parametrize("beta,placement,estimator", [(0.3, "loss", "k3"), (0.3, "loss", "k2_sequence")])
@pytest.mark.parametrize("loss_type", policy.LOSS_TYPES)
def test_two_microbatches_give_the_whole_batch_loss_and_gradient(loss_type, beta, placement, estimator):
  """Σ over microbatches of PolicySums, divided once by the total denominator, is the whole batch's
  loss/denominator, and each microbatch's gradient of loss_sum/den_total is its rows' share of the
  whole gradient. (Averaging each microbatch's own loss/denominator instead is not: checked too.)"""
  logp, old, ref, A, mask, row_valid = _rollout(2)
  cfg = policy.LossConfig(beta=beta, kl_placement=placement, kl_estimator=estimator, loss_type=loss_type,
                          cliprange=0.2, cliprange_high=0.28, max_new_tokens=mask.shape[1])
  whole, _ = _jax_sums_and_grad(logp, old, ref, A, mask, row_valid, cfg)
  den = policy.denominator(whole, cfg)
  _, whole_grad = _jax_sums_and_grad(logp, old, ref, A, mask, row_valid, cfg, den)
  parts = [slice(0, 2), slice(2, None)]  # 2 rows and 5 (one of them padding): unequal counts
  micro = [_jax_sums_and_grad(*(x[s] for x in (logp, old, ref, A, mask, row_valid)), cfg) for s in parts]
  total = interface.add(micro[0][0], micro[1][0])
  assert int(policy.denominator(total, cfg)) == int(den)
  assert_close(total.loss_sum / policy.denominator(total, cfg), whole.loss_sum / den)
  for field in whole._fields:
    assert_close(getattr(total, field), getattr(whole, field), err_msg=field)
  micro_grad = np.concatenate([np.asarray(_jax_sums_and_grad(*(x[s] for x in (logp, old, ref, A, mask, row_valid)),
                                                            cfg, den)[1]) for s in parts])
  assert_close(micro_grad, whole_grad)
  naive = np.mean([float(s.loss_sum / policy.denominator(s, cfg)) for s, _ in micro])
  assert abs(naive - float(whole.loss_sum / den)) > 1e-2 * abs(float(whole.loss_sum / den))
