"""The RL loop (`lmobjective/run/rollout.py` and `rl_loop.py`) on the bandit of `_rl.py`: what an iteration computes,
resume bit for bit after kill -9 mid-iteration, and bad input refused in one line."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from _rl import config_file, origin_config, rl_config, write_bandit
from _tiny import ROOT
from lmobjective.data import bandit as bandit_lib
from lmobjective.run import metrics_log, rollout, train

pytestmark = pytest.mark.slow  # a pretrained origin and RL runs: ~25 s in all (the math is in test_policy*.py)


@pytest.fixture(scope="module")
def bandit(tmp_path_factory):
  """(paths, cache, origin workdir): the pretrained origin every RL run here starts from."""
  d = tmp_path_factory.mktemp("bandit")
  paths, cache = write_bandit(str(d)), str(d / "cache")
  origin = str(d / "origin")
  train.run(origin_config(cache, paths), origin)
  return paths, cache, origin


@pytest.fixture(scope="module")
def short_run(bandit, tmp_path_factory):
  """Four iterations of RLOO, two updates each (rl.epochs = 2); (workdir, metrics lines)."""
  paths, cache, origin = bandit
  workdir = str(tmp_path_factory.mktemp("rl") / "run")
  train.run(rl_config(cache, paths, origin, **{"rl.epochs": 2}), workdir)
  return workdir, metrics_log.read_metrics(workdir)


def test_the_first_iteration_starts_at_the_reference(short_run):
  """Iteration 1 samples from the origin itself: every KL is 0, the trainer's forward reproduces the
  sampler's log-probs, and the first update's ratio is exactly 1 (its old log-probs are its own)."""
  _, lines = short_run
  first = next(r for r in lines if r["step"] == 1)
  assert first["objective/kl"] == 0.0 and first["objective/kl_full"] == 0.0
  assert first["objective/non_score_reward"] == 0.0
  assert first["sampler_trainer/logp_diff_max"] < 1e-5
  assert first["updates"] == 2 and first["completions/mean_length"] == 1.0
  assert first["completions/clipped_ratio"] == 1.0  # one token, no stop id: truncated, and scored
  assert first["objective/rlhf_reward"] == first["objective/scores"] == first["reward"]


def test_rewards_and_metric_definitions(short_run):
  """Each line's reward is the bandit's mean over its 16 responses; later iterations move off the
  reference (KL > 0), the sample and full-distribution KL estimates agree in size."""
  _, lines = short_run
  train_lines = [r for r in lines if "reward" in r]
  assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
  assert [r["updates"] for r in train_lines] == [2, 4, 6, 8]
  values = sorted(set(bandit_lib.REWARDS.values()) | {-1.0})
  for r in train_lines:
    assert min(values) <= r["reward"] <= max(values)
    assert r["rewards/reward/mean"] == pytest.approx(r["reward"])
    assert 0 <= r["frac_reward_zero_std"] <= 1 and r["policy/clipfrac_avg"] >= 0
  last = train_lines[-1]
  assert last["objective/kl_full"] > 0
  assert last["objective/non_score_reward"] == pytest.approx(-0.5 * last["objective/kl"])


def _params(workdir):
  from lmobjective.run import checkpoint as ckpt_lib
  mngr = ckpt_lib.make_manager(workdir, read_only=True)
  try:
    step = max(mngr.all_steps())
    restored = mngr.restore(step)
  finally:
    ckpt_lib.close(mngr)
  return step, jax.tree.leaves(jax.device_get(restored["state"]["params"]))


def _cli(config_path, workdir, faults=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("LMOBJECTIVE_FAULTS", None)
  if faults:
    env["LMOBJECTIVE_FAULTS"] = faults
  return subprocess.run([sys.executable, "-m", "lmobjective.train", f"--config={config_path}",
                         f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _kill_and_resume(bandit, uninterrupted, tmp_path, **keys):
  """SIGKILL before the 2nd update of iteration 3 (iteration 2's checkpoint saved or in flight), then
  resume: the final params and the metrics lines (timing aside) equal `uninterrupted`'s bit for bit."""
  paths, cache, origin = bandit
  config_path = config_file(tmp_path / "rl_config.py", rl_config(cache, paths, origin, **{"rl.epochs": 2, **keys}))
  workdir = str(tmp_path / "killed")
  killed = _cli(config_path, workdir, faults="update@6=kill")
  assert killed.returncode == -9, killed.stderr[-2000:]
  resumed = _cli(config_path, workdir)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  # iteration 2's save may still have been in flight (asynchronous) when the kill came: either lands here
  assert ("resuming from the checkpoint at iteration 2 (update 4)" in resumed.stdout or
          "resuming from the checkpoint at iteration 1 (update 2)" in resumed.stdout), resumed.stdout
  want_step, want = _params(uninterrupted[0])
  got_step, got = _params(workdir)
  assert got_step == want_step == 8
  assert all(np.array_equal(a, b) for a, b in zip(got, want))
  strip = lambda lines: [{k: v for k, v in r.items() if k != "iterations_per_sec"} for r in lines]
  assert strip(metrics_log.read_metrics(workdir)) == strip(uninterrupted[1])


def test_kill_9_mid_iteration_then_resume_equals_an_uninterrupted_run(bandit, short_run, tmp_path):
  """The resumed run samples the lost iterations again with the same keys (`_kill_and_resume`)."""
  _kill_and_resume(bandit, short_run, tmp_path)


def test_kill_9_mid_ppo_resumes_the_policy_and_its_value_head_bit_for_bit(bandit, tmp_path):
  """PPO: the value head's params and optimizer state are part of the state and the checkpoint; the old
  values and GAE are recomputed identically for the lost iterations."""
  paths, cache, origin = bandit
  workdir = str(tmp_path / "ppo")
  train.run(rl_config(cache, paths, origin, **{"rl.epochs": 2, "objective.kind": "ppo"}), workdir)
  lines = metrics_log.read_metrics(workdir)
  assert {"loss/value_avg", "val/clipfrac_avg", "val/num_eos_tokens", "val/var_explained"} <= set(lines[-1])
  assert "score_head" in jax.device_get(_params_tree(workdir))
  (tmp_path / "k").mkdir()
  _kill_and_resume(bandit, (workdir, lines), tmp_path / "k", **{"objective.kind": "ppo"})


def _params_tree(workdir):
  from lmobjective.run import checkpoint as ckpt_lib
  mngr = ckpt_lib.make_manager(workdir, read_only=True)
  try:
    return mngr.restore(max(mngr.all_steps()))["state"]["params"]
  finally:
    ckpt_lib.close(mngr)


def _refusal(config, workdir):
  with pytest.raises(Exception) as e:
    train.run(config, workdir)
  return str(e.value)


@pytest.mark.parametrize("overrides, key", [
    ({"rl.reward_fn": "{tmp}/nowhere.py:bandit"}, "rl.reward_fn"),
    ({"rl.reward_fn": "lmobjective.data.bandit:no_such_function"}, "rl.reward_fn"),
    ({"rl.num_generations": 1}, "rl.num_generations"),
    ({"rl.kl_placement": "loss", "rl.kl_estimator": "k1"}, "rl.kl_estimator"),
    ({"rl.kl_estimator": "k3"}, "rl.kl_estimator"),
    ({"model.dropout": 0.1}, "model.dropout"),
    ({"objective.kind": "ppo", "rl.gamma": 1.5}, "rl.gamma"),
    ({"objective.kind": "ppo", "rl.lam": -0.1}, "rl.lam"),
    ({"objective.kind": "ppo", "rl.kl_placement": "loss", "rl.kl_estimator": "k3"}, "rl.kl_placement"),
    ({"rl.vf_coef": 0.5}, "rl.vf_coef"),  # a PPO key under rloo
])
def test_bad_input_is_one_line_naming_the_key_and_writes_nothing(bandit, tmp_path, overrides, key):
  paths, cache, origin = bandit
  fill = lambda v: v.format(tmp=tmp_path) if isinstance(v, str) else v
  workdir = tmp_path / "bad"
  msg = _refusal(rl_config(cache, paths, origin, **{k: fill(v) for k, v in overrides.items()}), str(workdir))
  assert "\n" not in msg and msg.startswith(f"config.{key}="), msg
  assert not workdir.exists()


def test_a_reward_that_raises_mid_run_stops_with_the_last_checkpoint_intact(bandit, tmp_path):
  """The reward is fine for iteration 1 (saved), then raises: one line naming the function; the
  checkpoint of iteration 1 is still there and restores."""
  paths, cache, origin = bandit
  flaky = tmp_path / "flaky.py"
  flaky.write_text("import os\nCALLS = [0]\n\ndef flaky(prompts, completions, **_):\n  CALLS[0] += 1\n"
                   "  if CALLS[0] > 1:\n    raise RuntimeError('the grader is down')\n  return [1.0] * len(completions)\n")
  workdir = str(tmp_path / "run")
  msg = _refusal(rl_config(cache, paths, origin, **{"rl.reward_fn": f"{flaky}:flaky"}), workdir)
  assert "\n" not in msg and "flaky" in msg and "the grader is down" in msg, msg
  step, _ = _params(workdir)
  assert step == 1


def test_the_sampling_distribution_of_the_origin_matches_its_forward(bandit, tmp_path):
  """π_ref of the bandit, read two ways: the sampler's first-token log-probs and a reference table built
  from `reward_table` (sanity of the setup the sampled tier relies on)."""
  paths, cache, origin = bandit
  rlx = rollout.build(rl_config(cache, paths, origin), str(tmp_path / "b"))
  state = rlx.ms.init_fn(jax.random.key(0))
  ids = [rlx.tokenizer.eos_id] + rlx.tokenizer.encode("x")
  cfg = rollout.sampling_config(rlx, "x")
  logp_V = np.asarray(rlx.sampler.next_logps(state.params, [ids] * 2, cfg))[0]
  r_V = bandit_lib.reward_table(len(logp_V), rlx.tokenizer)
  p_V = np.exp(logp_V)
  assert p_V.sum() == pytest.approx(1.0, abs=1e-5)
  assert p_V[[rlx.tokenizer.encode(c)[0] for c in bandit_lib.REWARDS]].sum() > 0.5  # pretraining learned the candidates
  assert (r_V == -1.0).sum() == len(r_V) - 4


def test_eval_lines_carry_each_terms_held_out_reward_and_the_exact_kl(bandit, tmp_path):
  """Two reward terms (the bandit's, weight 1; twice it, weight 0: watched, not optimised): each term's held-out
  mean on the same responses, the total the weighted one; and val_kl_full_sampled: one token after one
  prompt, so every response's Σ_t KL is KL(π(·|x) ‖ π_ref(·|x)), computed here from the two distributions."""
  from lmobjective.analysis import fixed_points
  paths, cache, origin = bandit
  (tmp_path / "watch.py").write_text("from lmobjective.data import bandit\n\n"
                                     "def doubled(prompts, completions, **_):\n"
                                     "  return [2 * r for r in bandit.reward(prompts, completions)]\n")
  config = rl_config(cache, paths, origin, **{"rl.reward_fn": f"{bandit_lib.REWARD_FN},{tmp_path / 'watch.py'}:doubled",
                                              "rl.reward_weights": "1,0", "rl.eval_prompts": paths["prompts"],
                                              "eval.every_steps": 4, "rl.eval_samples": 8, "checkpoint.every_steps": 4})
  workdir = str(tmp_path / "run")
  train.run(config, workdir)
  evals = [r for r in metrics_log.read_metrics(workdir) if "val_reward_sampled" in r]
  assert [r["step"] for r in evals] == [0, 4]
  for r in evals:
    assert r["val_watched/doubled/sampled"] == pytest.approx(2 * r["val_rewards/reward/sampled"], rel=1e-12)
    assert r["val_reward_sampled"] == pytest.approx(r["val_rewards/reward/sampled"], rel=1e-12)
    assert r["val_reward_greedy"] == pytest.approx(r["val_rewards/reward/greedy"], rel=1e-12)
    assert r["val_watched/doubled/sampled_stderr"] == pytest.approx(2 * r["val_reward_sampled_stderr"], rel=1e-9)
  rlx = rollout.build(config, str(tmp_path / "probe"))
  from lmobjective.run import checkpoint as ckpt_lib
  mngr = ckpt_lib.make_manager(workdir, read_only=True)
  try:
    params = mngr.restore(4)["state"]["params"]
  finally:
    ckpt_lib.close(mngr)
  ids = [rlx.tokenizer.eos_id] + rlx.tokenizer.encode(bandit_lib.PROMPT)
  cfg = rollout.sampling_config(rlx, bandit_lib.PROMPT)
  logp = lambda p: np.asarray(rlx.sampler.next_logps(p, [ids], cfg), np.float64)[0]
  want = fixed_points.kl(logp(params), logp(rlx.ms.reference))
  assert evals[0]["val_kl_full_sampled"] == 0.0 and want > 1e-3
  assert evals[1]["val_kl_full_sampled"] == pytest.approx(want, rel=1e-4)


def test_the_standard_error_counts_prompts_not_samples():
  """[prompts, samples]: the per-prompt means' sample standard deviation over √prompts; NaN entries (a term
  that did not apply) left out of their prompt's mean, a prompt without any left out."""
  x = np.array([[1.0, 3.0], [2.0, np.nan], [np.nan, np.nan], [6.0, 8.0]])
  means = np.array([2.0, 2.0, 7.0])
  assert rollout.stderr(x) == pytest.approx(np.sqrt(((means - means.mean()) ** 2).sum() / 2) / np.sqrt(3), rel=1e-12)
  assert np.isnan(rollout.stderr(np.array([[1.0, 2.0]])))
