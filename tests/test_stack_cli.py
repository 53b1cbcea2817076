"""The objective stack from the command line: pretrain → SFT → DPO and SFT → reward model → PPO | RLOO, each
stage `init_from` the one before, and a DPO stage killed with SIGKILL mid-run that resumes bit for bit.

One config file, one stage per argument (`stack_config.py:pretrain|sft|dpo|reward_model|ppo|rloo`); every
run is the CLI a researcher types (`python -m lmobjective.train`), a few seconds each on CPU.
"""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults"))
from _faults import ROOT, cli, write_text  # noqa: E402
from _tensorboard import tensorboard_scalars  # noqa: E402

STEPS = 8
CONFIG = '''
from lmobjective.config import load_config_file
from configs.default import source


def get_config(stage):
  c = load_config_file({tiny!r})
  c.data.tokenizer.kind = "byte"
  c.data.cache_dir = {cache!r}
  paths = {{"pretrain": ("text", {text!r}), "sft": ("chat_jsonl", {chat!r}), "dpo": ("preference_jsonl", {pairs!r}),
            "reward_model": ("preference_jsonl", {pairs!r}), "ppo": ("prompts_jsonl", {prompts!r}),
            "rloo": ("prompts_jsonl", {prompts!r})}}
  kind, path = paths[stage]
  c.data.sources = {{stage: source(kind, 1.0, path=path, val_fraction=0.1)}}
  c.data.context_length = 48
  c.train.steps, c.train.log_every_steps = {steps}, 1
  c.checkpoint.every_steps, c.checkpoint.keep = 2, 10
  c.eval.every_steps, c.eval.batch_size, c.eval.num_batches = 4, 8, 4
  if stage == "dpo":
    c.objective.kind, c.objective.beta = "dpo", 0.1
    c.train.batch_size, c.train.grad_accum_steps = 8, 2  # pairs per step, two microbatches
  if stage == "reward_model":
    c.objective.kind, c.train.batch_size = "reward_model", 8
  if stage in ("ppo", "rloo"):  # the reward model optimised, the exact answer watched (weight 0)
    c.objective.kind, c.objective.beta, c.rl.reward_model = stage, 0.1, {rm!r}
    c.rl.reward_fn, c.rl.reward_weights = "lmobjective.rewards:exact_answer", "0,1"
    c.rl.max_new_tokens, c.rl.num_generations, c.train.batch_size = 8, 2, 4
  return c
'''


def _reverse_task(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  words = ["".join(rng.choice(list("abcdefgh"), rng.integers(3, 8))) for _ in range(n)]
  return [([{"role": "user", "content": f"reverse {w}"}], w[::-1], w) for w in words]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
  d = tmp_path_factory.mktemp("stack")
  text = write_text(d / "corpus.txt")
  tasks = _reverse_task(240)
  with open(d / "chat.jsonl", "w") as f:
    for prompt, answer, _ in tasks:
      f.write(json.dumps({"messages": prompt + [{"role": "assistant", "content": answer}]}) + "\n")
  with open(d / "pairs.jsonl", "w") as f:
    for prompt, answer, wrong in _reverse_task(240, seed=1):
      f.write(json.dumps({"prompt": prompt, "chosen": answer, "rejected": wrong}) + "\n")
  with open(d / "prompts.jsonl", "w") as f:
    f.writelines(json.dumps({"prompt": prompt, "answer": answer}) + "\n" for prompt, answer, _ in _reverse_task(60, seed=2))
  cfg = d / "stack_config.py"
  cfg.write_text(CONFIG.format(tiny=os.path.join(ROOT, "configs", "tiny.py"), cache=str(d / "cache"), text=str(text),
                               chat=str(d / "chat.jsonl"), pairs=str(d / "pairs.jsonl"), prompts=str(d / "prompts.jsonl"),
                               rm=str(d / "reward_model"), steps=STEPS))
  runs = {}
  for stage, origin in (("pretrain", None), ("sft", "pretrain"), ("dpo", "sft"), ("reward_model", "sft"), ("ppo", "sft"),
                        ("rloo", "sft")):
    args = [f"train.init_from={d / origin}"] if origin else []
    p = cli(f"{cfg}:{stage}", d / stage, *args)
    assert p.returncode == 0, p.stderr[-3000:]
    runs[stage] = p
  return d, cfg


def _lines(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.slow
def test_each_stage_starts_from_the_one_before(stack):
  d, _ = stack
  for stage, origin in (("sft", "pretrain"), ("dpo", "sft")):
    config = json.load(open(d / stage / "config.json"))
    assert config["origin"]["workdir"] == str(d / origin) and config["origin"]["step"] == STEPS
    assert open(d / stage / "tokenizer" / os.listdir(d / stage / "tokenizer")[0], "rb").read() == \
        open(d / origin / "tokenizer" / os.listdir(d / origin / "tokenizer")[0], "rb").read()
  first = _lines(d / "dpo")[0]
  assert first["step"] == 0 and abs(first["val_loss"] - np.log(2)) < 1e-6  # policy = reference at step 0
  assert abs(first["val_rewards/margins"]) < 1e-6 and abs(first["val_rewards/chosen"]) < 1e-6


@pytest.mark.slow
def test_dpo_lines_carry_trls_names_in_the_log_and_tensorboard(stack):
  d, _ = stack
  lines = _lines(d / "dpo")
  train = [r for r in lines if "train_loss" in r]
  assert len(train) == STEPS
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
    assert all(np.isfinite(r[key]) for r in train), key
    assert len(tensorboard_scalars(d / "dpo", key)) == STEPS, key
  val = [r for r in lines if "val_loss" in r]
  assert [r["step"] for r in val] == [0, 4, 8]
  for key in ("val_rewards/accuracies", "val_preference_accuracy", "val_preference_accuracy_normalized"):
    assert all(0.0 <= r[key] <= 1.0 for r in val), key
  assert val[-1]["val_num_pairs"] == 24  # each held-out pair once (32 slots: 8 are padding)
  assert os.path.exists(d / "dpo" / "loss_curves.png")


@pytest.mark.slow
def test_kill_9_mid_dpo_then_resume_equals_the_uninterrupted_run_bit_for_bit(stack):
  d, cfg = stack
  killed = d / "dpo_killed"
  args = [f"train.init_from={d / 'sft'}"]
  p = cli(f"{cfg}:dpo", killed, *args, faults="step@6=kill")  # after the checkpoint at step 4
  assert p.returncode == -9, p.stderr[-2000:]
  p = cli(f"{cfg}:dpo", killed, *args)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resuming from the checkpoint at step 4" in p.stdout
  assert "reference log-probs of 'dpo': reused" in p.stdout  # the cached default: scored once, by the first run
  drop = ("positions_per_sec", "mfu")
  strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
  assert strip(_lines(killed)) == strip(_lines(d / "dpo"))
  from lmobjective.analysis import inspection
  a, b = inspection.restore(str(d / "dpo")), inspection.restore(str(killed))
  import jax
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)


@pytest.mark.slow
def test_a_chat_prompt_is_rendered_with_the_template_and_the_reply_ends_at_the_turn(stack):
  d, _ = stack
  from lmobjective.analysis import inspection
  from lmobjective.data import sft
  run = inspection.restore(str(d / "sft"))
  messages = [{"role": "user", "content": "reverse abcd"}]
  assert run.prompt_ids(messages) == sft.render_prompt(messages, run.tokenizer)
  new = run.generate_ids(messages, max_new_tokens=12, temperature=0.0)
  reply = run.generate(messages, max_new_tokens=12, temperature=0.0)
  stops = [i for i, t in enumerate(new) if t in (run.tokenizer.eos_id, run.tokenizer.special_id("<|end|>"))]
  assert reply == run.tokenizer.decode(new[:stops[0] if stops else len(new)])
  assert "<|end|>" not in reply


@pytest.mark.slow
def test_the_stack_table_agrees_with_each_stages_own_eval_lines(stack, tmp_path):
  d, _ = stack
  import dataclasses

  from lmobjective.analysis import evaluate, inspection
  from lmobjective.analysis import stack as stack_table
  workdirs = {"pretrained": str(d / "pretrain"), "sft": str(d / "sft"), "dpo": str(d / "dpo"), "ppo": str(d / "ppo")}
  rows = {r["stage"]: r for r in stack_table.rows(workdirs)}
  last = lambda w: [r for r in _lines(w) if "val_loss" in r][-1]
  first = lambda w: [r for r in _lines(w) if "val_loss" in r][0]
  # each stage's own column is what its run logged on the same rows with the same params
  assert abs(rows["pretrained"]["pretrain_val_loss"] - last(d / "pretrain")["val_loss"]) < 1e-6
  assert abs(rows["sft"]["sft_val_loss"] - last(d / "sft")["val_loss"]) < 1e-6
  assert abs(rows["pretrained"]["sft_val_loss"] - first(d / "sft")["val_loss"]) < 1e-6  # SFT's step 0
  assert rows["dpo"]["pref_accuracy"] == last(d / "dpo")["val_preference_accuracy"]
  assert rows["sft"]["pref_accuracy"] == first(d / "dpo")["val_preference_accuracy"]  # DPO's step 0
  assert rows["dpo"]["pref_accuracy_norm"] == last(d / "dpo")["val_preference_accuracy_normalized"]
  assert rows["dpo"]["rewards/margins"] == last(d / "dpo")["val_rewards/margins"]
  assert rows["sft"]["rewards/margins"] is None and rows["dpo"]["num_pairs"] == 24
  assert rows["sft"]["docstring_acc"] is None  # the task is the stdlib SFT source's held-out modules: not this one
  logps = last(d / "dpo")
  assert abs(rows["dpo"]["logp_margin"] - (logps["val_logps/chosen"] - logps["val_logps/rejected"])) < 1e-4
  md, path_csv = stack_table.save(list(rows.values()), str(tmp_path))
  assert open(md).read().splitlines()[0].startswith("| stage | step | pretrain_val_loss")
  assert len(open(path_csv).read().splitlines()) == 5
  assert stack_table.kind_rows(workdirs) is None  # a preference_jsonl source has no kinds of negative
  by_kind = [{"stage": s, "kind": k, "num_pairs": n, "pref_accuracy": a, "pref_accuracy_norm": b, "logp_margin": 0.0}
             for s, k, n, a, b in (("sft", "hard", 3, 1 / 3, 2 / 3), ("dpo", "hard", 3, 1.0, 2 / 3))]
  assert stack_table.kind_markdown(by_kind).splitlines()[2] == "| hard | 3 | 0.333 / 0.667 | 1.000 / 0.667 |"
  # PPO's policy (its value head beside it) scored as a language model, and compared with SFT, where it started
  ppo = inspection.restore(str(d / "ppo"))
  assert abs(rows["ppo"]["sft_val_loss"] - evaluate.evaluate_source(dataclasses.replace(
      inspection.restore(str(d / "sft")), params={k: v for k, v in ppo.params.items() if k != "score_head"}),
      "sft")["loss"]) < 1e-6
  # the paired comparison counts the same pairs the accuracies count, each stage against its origin
  compared = stack_table.comparisons(list(rows.values()))
  assert [(c["stage"], c["against"]) for c in compared] == [("sft", "pretrained"), ("dpo", "sft"), ("ppo", "sft")]
  for c in compared:
    assert c["num_pairs"] == 24
    assert abs(c["difference"] - (rows[c["stage"]]["pref_accuracy"] - rows[c["against"]]["pref_accuracy"])) < 1e-9


@pytest.mark.slow
def test_the_rlhf_branch_reads_the_reward_model_on_every_held_out_pair_and_the_rl_lines(stack):
  """SFT -> reward model -> PPO | RLOO: the reward model's accuracy over every held-out pair (scored as `Run.reward`
  scores text) equals its own last val line's (4 batches of 8 slots: the 24 held-out pairs once); each RL
  stage's figures are its first and last eval and train lines."""
  d, _ = stack
  from lmobjective.analysis import stack as stack_table
  rm = stack_table.reward_model_row(str(d / "reward_model"))
  last = [r for r in _lines(d / "reward_model") if "val_loss" in r][-1]
  assert rm["num_pairs"] == last["val_num_pairs"] == 24 and rm["step"] == STEPS
  assert abs(rm["accuracy"] - last["val_accuracy"]) < 1e-9 and abs(rm["margin"] - last["val_margin"]) < 1e-4
  rl_rows = [stack_table.rl_row(str(d / k)) for k in ("ppo", "rloo")]
  for row in rl_rows:
    lines = _lines(d / row["stage"])
    evals, train = [r for r in lines if "val_reward_sampled" in r], [r for r in lines if "objective/kl" in r]
    assert row["eval_steps"] == (0, STEPS) and row["step"] == STEPS and row["first_and_last"] == (1, STEPS)
    assert row["val_reward_greedy"] == (evals[0]["val_reward_greedy"], evals[-1]["val_reward_greedy"])
    assert row["objective/kl"] == (train[0]["objective/kl"], train[-1]["objective/kl"])
    assert all(np.isfinite(v) for v in row["objective/scores"])
  assert all(np.isfinite(v) for v in rl_rows[0]["val/var_explained"]) and rl_rows[1]["val/var_explained"] == (None, None)
  md = stack_table.rlhf_markdown(rm, rl_rows)
  assert f"held-out accuracy {rm['accuracy']:.4f} on 24 pairs" in md
  assert "| | ppo start | ppo end | rloo start | rloo end |" in md and "| train lines | 1 | 8 | 1 | 8 |" in md


@pytest.mark.slow
def test_every_policy_is_scored_on_the_rl_stages_held_out_prompts_as_its_eval_lines_score(stack, tmp_path):
  """The policy table from RLOO's config: SFT's greedy gold (exact answer) is RLOO's step-0 eval line's, RLOO's
  is its last line's (greedy answers do not depend on the stream); SFT's KL to itself, the reference, is
  0 and the others' positive; each comparison is against SFT on the same prompts."""
  d, _ = stack
  from lmobjective.analysis import stack as stack_table
  scores = stack_table.policy_scores(str(d / "rloo"), {k: str(d / k) for k in ("sft", "dpo", "ppo", "rloo")},
                                     str(tmp_path / "probe"))
  evals = [r for r in _lines(d / "rloo") if "val_reward_sampled" in r]
  assert scores["sft"]["gold_greedy"].mean() == evals[0]["val_watched/exact_answer/greedy"]
  assert scores["rloo"]["gold_greedy"].mean() == evals[-1]["val_watched/exact_answer/greedy"]
  assert len(scores["sft"]["kl"]) == 6 and (scores["sft"]["kl"] == 0).all()
  assert all((scores[k]["kl"] > 0).all() for k in ("dpo", "ppo", "rloo"))
  rows = {r["stage"]: r for r in stack_table.policy_rows(scores)}
  assert "gold_vs" not in rows["sft"]
  for k in ("dpo", "ppo", "rloo"):
    assert abs(rows[k]["proxy_vs"]["difference"] - (rows[k]["proxy"] - rows["sft"]["proxy"])) < 1e-12
    assert rows[k]["proxy_vs"]["low"] <= rows[k]["proxy_vs"]["difference"] <= rows[k]["proxy_vs"]["high"]
    assert rows[k]["pass@1_vs"]["num_pairs"] == 6
  md = stack_table.policy_markdown(list(rows.values()))
  assert md.splitlines()[2].startswith(f"| sft | 6 | {rows['sft']['gold_greedy']:.4f} |") and md.count("\n") == 6


def test_the_paired_bootstrap_interval_is_scipys():
  """The percentile interval of the paired mean difference against scipy.stats.bootstrap (another resampler:
  the ends agree to Monte Carlo error, a few hundredths of the standard error), and it covers nothing
  when both sides are equal."""
  from scipy import stats
  from lmobjective.analysis import stack as stack_table
  rng = np.random.default_rng(3)
  before = rng.random(300)
  after = before + rng.normal(0.05, 0.3, 300)
  got = stack_table.paired_bootstrap(before, after, resamples=20_000)
  want = stats.bootstrap((after - before,), np.mean, n_resamples=20_000, method="percentile", confidence_level=0.95,
                         random_state=1).confidence_interval
  se = (after - before).std() / np.sqrt(300)
  assert abs(got["low"] - want.low) < 0.05 * se and abs(got["high"] - want.high) < 0.05 * se
  assert abs(got["difference"] - (after - before).mean()) < 1e-12
  assert stack_table.paired_bootstrap(before, before) == {"difference": 0.0, "low": 0.0, "high": 0.0}


@pytest.mark.parametrize("gained,lost,same", [(0, 0, 5), (7, 2, 11), (30, 12, 300), (1, 0, 0), (40, 40, 3)])
def test_mcnemar_p_value_equals_scipys_exact_binomial_test(gained, lost, same):
  from scipy import stats
  from lmobjective.analysis import stack as stack_table
  before = np.array([False] * gained + [True] * lost + [True] * same)
  after = np.array([True] * gained + [False] * lost + [True] * same)
  c = stack_table.mcnemar(before, after)
  assert (c["gained"], c["lost"], c["num_pairs"]) == (gained, lost, gained + lost + same)
  expected = stats.binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
  assert abs(c["p_value"] - expected) < 1e-12
  assert abs(c["difference"] - (gained - lost) / (gained + lost + same)) < 1e-12
