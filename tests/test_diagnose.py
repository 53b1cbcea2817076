"""Loss-curve diagnostics: crafted curves give each kind with the right steps; real runs are classified."""

import math
import os

import numpy as np
import pytest

from lmobjective.analysis import diagnose, post_run
from lmobjective.run import metrics_log, train
from _tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 512


def curve(train_loss, val_every=50, val=None, seed=0):
  """Records as train.py writes them: a train line per step, an eval line every `val_every` steps."""
  steps = np.arange(1, len(train_loss) + 1)
  records = [{"step": int(s), "train_loss": float(l)} for s, l in zip(steps, train_loss)]
  val = train_loss + 0.05 if val is None else val
  for s in range(0, len(train_loss) + 1, val_every):
    records.append({"step": s, "val_loss": float(val[max(s - 1, 0)])})
  return sorted(records, key=lambda r: r["step"])


def healthy(n=300, seed=0, noise=0.02):
  s = np.arange(1, n + 1)
  return 2.0 + 4.0 * np.exp(-s / 40) + noise * np.random.default_rng(seed).standard_normal(n)


def kinds(findings):
  return [(f["kind"], f["start_step"], f["end_step"]) for f in findings]


def test_healthy_curve_has_no_findings():
  for seed in range(5):
    assert diagnose.diagnose(curve(healthy(seed=seed)), V) == [], seed


# A real tiny-preset run at peak LR 3e-2 (10x the default), 60 steps of batch 8: noisy, slowly falling.
REAL_NOISY_TRAIN = [
    6.219, 6.128, 5.646, 5.355, 5.398, 5.71, 5.221, 5.345, 5.479, 5.174, 5.193, 5.187, 5.125, 5.787, 5.277,
    5.378, 5.333, 5.302, 5.136, 5.279, 5.148, 5.2, 5.158, 5.104, 5.051, 5.131, 5.091, 5.289, 5.207, 4.895,
    5.04, 5.148, 5.066, 5.146, 5.093, 4.994, 4.946, 5.047, 4.907, 4.953, 5.046, 4.812, 4.84, 4.832, 4.812,
    4.882, 4.861, 4.89, 4.935, 4.986, 4.983, 4.878, 4.858, 4.839, 5.007, 4.937, 4.823, 4.872, 4.956, 5.163]
REAL_NOISY_VAL = [(0, 6.151), (10, 5.551), (20, 5.383), (30, 5.119), (40, 4.947), (50, 4.818), (60, 4.778)]


def test_real_noisy_slow_descent_has_no_findings():
  records = [{"step": i + 1, "train_loss": l} for i, l in enumerate(REAL_NOISY_TRAIN)]
  records += [{"step": s, "val_loss": v} for s, v in REAL_NOISY_VAL]
  assert diagnose.diagnose(sorted(records, key=lambda r: r["step"]), V) == []


def test_spike_that_recovers():
  loss = healthy()
  loss[149:152] += 1.5  # steps 150..152
  assert kinds(diagnose.diagnose(curve(loss), V)) == [("spike", 150, 152)]


def test_small_bump_within_noise_is_not_a_spike():
  loss = healthy(noise=0.02)
  loss[149] += 4 * 0.02  # 4 sigma < the 6-sigma threshold
  assert diagnose.diagnose(curve(loss), V) == []


def test_divergence_rise_without_recovery():
  loss = healthy()
  loss[150:] += np.linspace(0, 3, 150)  # from step 151 the loss climbs 3 nats and stays
  (kind, start, end), = kinds(diagnose.diagnose(curve(loss), V))
  assert kind == "divergence" and 150 <= start <= 165 and end == 300


def test_spike_that_never_recovers_is_divergence():
  loss = healthy()
  loss[199:] = 7.0  # from step 200
  assert kinds(diagnose.diagnose(curve(loss), V)) == [("divergence", 200, 300)]


def test_nan_is_divergence_from_its_step():
  records = curve(healthy())
  for r in records:
    if r["step"] >= 230 and "train_loss" in r:
      r["train_loss"] = "nan"  # as metrics_log writes a non-finite float
  assert kinds(diagnose.diagnose(records, V)) == [("divergence", 230, 300)]


def test_early_plateau_then_learning():
  s = np.arange(1, 301)
  loss = np.where(s <= 100, 5.0, 2.0 + 3.0 * np.exp(-(s - 100) / 30))
  loss = loss + 0.01 * np.random.default_rng(0).standard_normal(300)
  (kind, start, end), = kinds(diagnose.diagnose(curve(loss), V))
  assert kind == "plateau" and start == 1 and 95 <= end <= 103


def test_overfitting_val_rises_while_train_falls():
  loss = healthy()
  val = loss + 0.05
  val[150:] += np.linspace(0, 0.3, 150)  # val turns up after step 150 while train keeps falling
  assert kinds(diagnose.diagnose(curve(loss, val=val), V)) == [("overfitting", 150, 300)]


def test_not_learning_stays_near_ln_v():
  loss = math.log(V) - 0.001 * np.arange(300) / 300 + 0.01 * np.random.default_rng(0).standard_normal(300)
  (kind, start, end), = kinds(diagnose.diagnose(curve(loss), V))
  assert (kind, start, end) == ("not_learning", 0, 300)
  assert kinds(diagnose.diagnose(curve(loss), None))[0][0] == "not_learning"  # ln V from the first eval


# ---- real runs (tiny preset) -------------------------------------------------------------------


def _tiny(tmp_path, **overrides):
  return tiny_config(tmp_path.parent / "diag_cache", **overrides)


def _run(tmp_path, name, **overrides):
  workdir = str(tmp_path / name)
  train.run(_tiny(tmp_path, **overrides), workdir, post_run=(post_run.diagnostics,))  # the step that writes it
  return diagnose.load(workdir), metrics_log.read_metrics(workdir)


@pytest.mark.slow
def test_real_runs_are_classified(tmp_path):
  common = {"train.steps": 40, "eval.every_steps": 10, "optimizer.warmup_steps": 5}
  ok, _ = _run(tmp_path, "healthy", **common)
  assert ok == []
  low, _ = _run(tmp_path, "lr_1e-7", **common, **{"optimizer.learning_rate": 1e-7,
                                                  "optimizer.end_learning_rate": 1e-8})
  assert [f["kind"] for f in low] == ["not_learning"]
  high, records = _run(tmp_path, "lr_high", **common, **HIGH_LR)
  assert "divergence" in [f["kind"] for f in high], (high, [r.get("train_loss") for r in records])
  over, _ = _run(tmp_path, "overfit", **OVERFIT)
  assert "overfitting" in [f["kind"] for f in over], over


# Found by trying peak LRs on the tiny preset (default peak 3e-3, cosine, clip 1.0, 60 steps): 3e-2
# (10x) and 0.3 (100x) with the default clipping still learn (val 4.78 and 5.13 vs 4.78 healthy),
# because global-norm clipping bounds every Adam step. What reliably diverges is 1.0 (333x), constant,
# without clipping: the loss jumps to 20-40 nats within 3 steps and stays there (NaN policy 'skip'
# so the run reaches its end instead of stopping at a NaN).
HIGH_LR = {"optimizer.learning_rate": 1.0, "optimizer.end_learning_rate": 1.0, "optimizer.grad_clip": 0.0,
           "optimizer.schedule": "constant", "train.nan_policy": "skip"}
# 3 documents per source, repeated for 200 steps at a constant LR without weight decay: val bottoms
# out near step 50 and climbs while train loss falls towards 0.
OVERFIT = {"train.steps": 200, "eval.every_steps": 25, "train.log_every_steps": 5,
           "data.sources.code.max_documents": 3, "data.sources.prose.max_documents": 3,
           "data.sources.markov.markov.num_documents": 3, "optimizer.weight_decay": 0.0,
           "optimizer.end_learning_rate": 3e-3, "optimizer.schedule": "constant"}


# ---- training broke down (issue #12) -----------------------------------------------------------

# `python -m lmobjective.train --config=configs/tiny.py --workdir=/tmp/div_skip
#  --config.optimizer.learning_rate=1e3 --config.train.nan_policy=skip` (V = 512, ln V = 6.238, 20
# steps, CPU, 2026-12-02): exit 0; the old diagnosis said not_learning (steps 0-20) with "learning
# rate far too low". The same without nan_policy (default 'stop') wrote the same lines to step 6 and
# stopped at step 7 (exit 1, NaN); the old diagnosis of that file: no findings.
#   step  train_loss  grad_norm  param_norm  update_norm  tokens_seen
#   1     6.2192      0.9317     1.867e5     1.867e5      256
#   2     5.271e6     6088.1     1.602e7     1.618e7      512
#   3-6   6.2383      0.0        1.586e9 .. 1.380e15      768 .. 1536   (dead: uniform logits)
#   7-20  {"step": s, "skipped_steps": s - 6} only (skip run); val_loss 6.1511 @0, 6.2383 @10, @20
REAL_LR_1E3 = [
    (1, 6.2192, 0.9317, 186745.98), (2, 5270979.5, 6088.088, 16021025.0), (3, 6.2383, 0.0, 1586045312.0),
    (4, 6.2383, 0.0, 155813625856.0), (5, 6.2383, 0.0, 14955713658880.0), (6, 6.2383, 0.0, 1380431479963648.0)]


def lr_1e3_run(nan_policy):
  records = [{"step": 0, "val_loss": 6.1511}]
  records += [{"step": s, "train_loss": l, "grad_norm": g, "param_norm": p, "tokens_seen": 256 * s}
              for s, l, g, p in REAL_LR_1E3]
  if nan_policy == "skip":
    for s in range(7, 21):
      records.append({"step": s, "skipped_steps": s - 6})
      if s % 10 == 0:
        records.append({"step": s, "val_loss": 6.2383})
  return records


def test_lr_1e3_with_skip_is_divergence_not_a_too_low_lr():
  (found,) = diagnose.diagnose(lr_1e3_run("skip"), V)
  assert (found["kind"], found["start_step"], found["end_step"]) == ("divergence", 3, 20)
  for evidence in ("grad_norm is exactly 0 from step 3", "param_norm grew from 1.87e+05 (step 1) to 1.59e+09 by step 3",
                   "14 of 20 steps (70% >= 10%) skipped", "not because the learning rate is too low"):
    assert evidence in found["detail"]
  assert "far too low" not in found["detail"]


def test_lr_1e3_with_the_default_policy_is_divergence():
  assert kinds(diagnose.diagnose(lr_1e3_run("stop"), V)) == [("divergence", 3, 6)]
  stopped = lr_1e3_run("stop") + [{"step": 7, "diverged": "non-finite loss or gradient at step 7"}]
  (found,) = diagnose.diagnose(stopped, V)
  assert (found["start_step"], found["end_step"]) == (3, 7)
  assert "stopped the run at step 7: non-finite loss or gradient at step 7" in found["detail"]


def with_norms(records, grad=1.0, param=50.0, skipped=None):
  """Train lines get grad_norm, param_norm, tokens_seen (256 a step) and skipped_steps as train.py writes them."""
  out = []
  for r in records:
    r = dict(r)
    if "train_loss" in r:
      s = r["step"]
      r.update(grad_norm=grad(s) if callable(grad) else grad, param_norm=param(s) if callable(param) else param,
               tokens_seen=256 * s)
      if skipped and skipped(s):
        r["skipped_steps"] = skipped(s)
    out.append(r)
  return out


def test_a_diverged_line_alone_is_divergence_from_its_step():
  records = [r for r in with_norms(curve(healthy())) if r["step"] <= 150]
  records.append({"step": 150, "diverged": "exploded: param_norm 1e12"})
  assert kinds(diagnose.diagnose(records, V)) == [("divergence", 150, 150)]


def test_skipped_steps_count_from_a_tenth_of_the_run():
  many = with_norms(curve(healthy()), skipped=lambda s: max(0, (s - 100) // 5))  # 40 of 300 = 13%
  assert kinds(diagnose.diagnose(many, V)) == [("divergence", 105, 300)]
  few = with_norms(curve(healthy()), skipped=lambda s: max(0, (s - 100) // 8))  # 25 of 300 = 8%
  assert diagnose.diagnose(few, V) == []


def test_zero_grad_norm_is_dead_only_where_tokens_were_scored():
  dead = with_norms(curve(healthy()), grad=lambda s: 0.0 if s >= 200 else 1.0)
  assert kinds(diagnose.diagnose(dead, V)) == [("divergence", 200, 300)]
  no_tokens = [dict(r, tokens_seen=256 * 199) if r["step"] == 200 and "train_loss" in r else r
               for r in with_norms(curve(healthy()), grad=lambda s: 0.0 if s == 200 else 1.0)]
  assert diagnose.diagnose(no_tokens, V) == []


def test_param_norm_growth_beyond_100x_its_first_value():
  grown = with_norms(curve(healthy()), param=lambda s: 10.0 * 1.02 ** s)  # x100 after ln 100 / ln 1.02 = 233 steps
  assert kinds(diagnose.diagnose(grown, V)) == [("divergence", 234, 300)]
  assert diagnose.diagnose(with_norms(curve(healthy()), param=lambda s: 10.0 * 1.01 ** s), V) == []  # x20


def test_findings_before_a_breakdown_are_kept_and_after_it_dropped():
  loss = healthy()
  loss[99:102] += 1.5  # a spike at steps 100-102, before the model dies at 200
  loss[249:252] += 1.5  # one after it: a dead model's curve says nothing
  records = with_norms(curve(loss), grad=lambda s: 0.0 if s >= 200 else 1.0)
  assert kinds(diagnose.diagnose(records, V)) == [("spike", 100, 102), ("divergence", 200, 300)]


# ---- reward maximisation: the rollout metrics ----------------------------------------------------------


def rl_records(n=40, every=5, **curves):
  """Train lines as run/rl_loop.py writes them every `every` iterations: a healthy run (reward rising from
  0.3 to 0.7, KL growing to 0.05 nats a token, entropy falling by a third, 3-token responses), with any
  metric replaced by `curves[name](iteration)`; a policy loss near 0 and an eval line every 10."""
  base = {"reward": lambda s: 0.3 + 0.4 * s / n, "objective/kl": lambda s: 0.15 * s / n,
          "objective/kl_full_per_token": lambda s: 0.05 * s / n, "objective/entropy_full": lambda s: 3.0 * (1 - s / (3 * n)),
          "completions/mean_length": lambda s: 3.0, "frac_reward_zero_std": lambda s: 0.3,
          "completions/clipped_ratio": lambda s: 0.0, "grad_norm": lambda s: 0.5, "param_norm": lambda s: 40.0,
          "signal_sequences": lambda s: 90, "train_loss": lambda s: 1e-4 * (-1) ** s}
  base.update({k.replace("__", "/"): v for k, v in curves.items()})
  records = [{"step": 0, "val_reward_greedy": 0.3, "param_norm": 40.0}]
  for s in range(every, n + 1, every):
    records.append({"step": s, "tokens_seen": 384 * s, **{k: float(f(s)) for k, f in base.items()}})
    if s % 10 == 0:
      records.append({"step": s, "val_reward_greedy": 0.3 + 0.4 * s / n})
  return records


def test_healthy_rl_run_has_no_findings():
  """A policy loss that sits at 0 is no plateau and no not_learning: the loss-curve kinds do not apply."""
  assert diagnose.diagnose(rl_records(), V) == []


def test_kl_blowup_from_the_first_line_above_a_nat_per_token():
  found = diagnose.diagnose(rl_records(objective__kl_full_per_token=lambda s: 0.02 * 1.2 ** s), V)
  assert kinds(found) == [("kl_blowup", 25, 40)]  # 0.02 * 1.2**25 = 1.9; at 20 it is 0.77
  assert "per sampled token (> 1)" in found[0]["detail"] and "objective.beta too small" in found[0]["detail"]


def test_entropy_collapse_below_a_tenth_of_the_first_value():
  collapse = lambda s: 3.0 * 0.8 ** s  # first line (s = 5) 0.33 a token; below a tenth once 0.8**(s-5) < 0.1: s >= 16
  found = diagnose.diagnose(rl_records(objective__entropy_full=collapse, reward=lambda s: 0.3), V)
  assert kinds(found) == [("entropy_collapse", 20, 40)]
  assert "with the mean reward there 0.3" in found[0]["detail"]
  slow = lambda s: 3.0 * 0.8 ** (s / 4)  # at s = 40 0.8**8.75 = 0.14 of s = 0, 0.19 of the first line
  assert diagnose.diagnose(rl_records(objective__entropy_full=slow), V) == []


def test_no_signal_needs_a_fifth_of_the_lines():
  found = diagnose.diagnose(rl_records(frac_reward_zero_std=lambda s: 1.0 if s >= 30 else 0.3,
                                       reward=lambda s: 0.0 if s >= 30 else 0.2), V)
  assert kinds(found) == [("no_signal", 30, 40)]  # 3 of 8 lines
  assert "on 3 of 8 train lines" in found[0]["detail"] and "mean reward there 0" in found[0]["detail"]
  assert diagnose.diagnose(rl_records(frac_reward_zero_std=lambda s: 1.0 if s == 40 else 0.3), V) == []  # 1 of 8


def test_truncation_share():
  found = diagnose.diagnose(rl_records(completions__clipped_ratio=lambda s: 0.5 if s >= 20 else 0.1), V)
  assert kinds(found) == [("truncation", 20, 40)]
  assert diagnose.diagnose(rl_records(completions__clipped_ratio=lambda s: 0.19), V) == []


def test_zero_grad_norm_without_signal_is_no_dead_model():
  """An RL update whose advantages are all 0 has a zero gradient by design; with signal it is a dead model."""
  quiet = rl_records(grad_norm=lambda s: 0.0 if s == 20 else 0.5, signal_sequences=lambda s: 0 if s == 20 else 90)
  assert diagnose.diagnose(quiet, V) == []
  dead = rl_records(grad_norm=lambda s: 0.0 if s >= 20 else 0.5)
  assert kinds(diagnose.diagnose(dead, V)) == [("divergence", 20, 40)]


def ppo_records(**curves):
  """`rl_records` with a critic that learns: value loss 0.5 -> 0.1, explained variance 0.1 -> 0.8."""
  return rl_records(**{"loss/value_avg": lambda s: 0.5 - 0.4 * s / 40, "val/var_explained": lambda s: 0.1 + 0.7 * s / 40,
                       **curves})


def test_healthy_ppo_run_has_no_findings():
  assert diagnose.diagnose(ppo_records(), V) == []


def test_value_blowup_where_the_loss_jumps_and_the_critic_is_worse_than_the_mean():
  jump = lambda s: 5.0 if s >= 30 else 0.5 - 0.4 * s / 40  # 0.25 at s = 25, then 5.0: 20x
  found = diagnose.diagnose(ppo_records(loss__value_avg=jump, val__var_explained=lambda s: -2.0 if s >= 30 else 0.5), V)
  assert kinds(found) == [("value_blowup", 30, 40)]
  assert "20x its minimum 0.25" in found[0]["detail"] and "explaining -2" in found[0]["detail"]
  # the same jump while the critic still explains the returns (their scale grew): no finding
  assert diagnose.diagnose(ppo_records(loss__value_avg=jump), V) == []
  nan = diagnose.diagnose(ppo_records(loss__value_avg=lambda s: float("nan") if s == 35 else 0.3), V)
  assert kinds(nan) == [("value_blowup", 35, 35)]


def test_critic_unexplained_needs_five_consecutive_lines():
  found = diagnose.diagnose(ppo_records(val__var_explained=lambda s: -0.1 if s >= 15 else 0.3), V)
  assert kinds(found) == [("critic_unexplained", 15, 40)]  # 6 consecutive lines of 8
  assert "on 6 consecutive train lines of 8, steps 15-40" in found[0]["detail"]
  zero = diagnose.diagnose(ppo_records(val__var_explained=lambda s: 0.0 if s >= 15 else 0.3), V)
  assert kinds(zero) == [("critic_unexplained", 15, 40)]  # explaining exactly none counts
  fresh = lambda s: 0.0 if s <= 15 else 0.4  # a zero-initialised head explains 0 on its first 3 lines
  assert diagnose.diagnose(ppo_records(val__var_explained=fresh), V) == []
  broken = lambda s: -0.5 if s % 10 == 0 else 0.2  # 4 lines, never 2 in a row
  assert diagnose.diagnose(ppo_records(val__var_explained=broken), V) == []


def watched_records(proxy, gold, steps=(0, 10, 20, 30, 40)):
  """`rl_records` plus held-out eval lines with the optimised reward and a watched (weight-0) gold term."""
  evals = [{"step": s, "val_reward_sampled": proxy(s), "val_watched/gold/sampled": gold(s)} for s in steps]
  return rl_records() + evals


def test_reward_hacking_where_the_proxy_rises_past_the_gold_peak():
  found = diagnose.diagnose(watched_records(proxy=lambda s: 1.0 + 0.1 * s, gold=lambda s: 0.3 + 0.02 * min(s, 20) - 0.02 * max(s - 20, 0)), V)
  assert kinds(found) == [("reward_hacking", 20, 40)]  # gold 0.3 -> 0.7 at step 20 -> 0.3; proxy 3.0 -> 5.0
  assert "rose 3 -> 5 on held-out prompts from step 20 to 40 while the watched reward 'gold' fell 0.7 -> 0.3" in found[0]["detail"]


def test_no_reward_hacking_when_both_rise_or_both_fall_or_gold_barely_dips():
  assert diagnose.diagnose(watched_records(proxy=lambda s: 1.0 + 0.1 * s, gold=lambda s: 0.3 + 0.01 * s), V) == []
  falling = lambda s: 1.0 - 0.01 * s  # the proxy falls too: a worse model, not a hacked proxy
  assert diagnose.diagnose(watched_records(proxy=falling, gold=falling), V) == []
  dip = lambda s: 0.3 + 0.02 * min(s, 30) - 0.02 * max(s - 30, 0)  # 0.9 at 30, 0.7 at 40: a third of the rise
  assert kinds(diagnose.diagnose(watched_records(proxy=lambda s: 1.0 + 0.1 * s, gold=dip), V)) == [("reward_hacking", 30, 40)]
  small = lambda s: 0.3 + 0.02 * min(s, 30) - 0.01 * max(s - 30, 0)  # 0.8 at 40: a sixth of it, within noise
  assert diagnose.diagnose(watched_records(proxy=lambda s: 1.0 + 0.1 * s, gold=small), V) == []


def test_no_reward_hacking_when_the_gold_fall_is_within_its_standard_errors():
  """A PPO run against a proxy fitted on 270 pairs (2026-12-06): the gold F1 on 96 held-out prompts never moved
  (0.0779, 0.0792, 0.0708, 0.0814, 0.0704, standard errors ~0.006) while the proxy rose. Without the standard
  errors its last eval's 0.011 below the peak is a fall; with them it is 1.3 standard errors: no finding.
  Three times farther down it is one (z = 4)."""
  gold, proxy, steps = [0.0779, 0.0792, 0.0708, 0.0814, 0.0704], [-0.239, -0.082, 0.784, 1.021, 1.969], (0, 15, 30, 45, 60)
  lines = lambda g, se: rl_records() + [{"step": s, "val_reward_sampled": p, "val_reward_sampled_stderr": 0.05,
                                         "val_watched/gold/sampled": x, **({"val_watched/gold/sampled_stderr": se} if se else {})}
                                        for s, p, x in zip(steps, proxy, g)]
  assert kinds(diagnose.diagnose(lines(gold, None), V)) == [("reward_hacking", 45, 60)]
  assert diagnose.diagnose(lines(gold, 0.006), V) == []
  assert kinds(diagnose.diagnose(lines(gold[:4] + [0.0814 - 0.035], 0.006), V)) == [("reward_hacking", 45, 60)]
