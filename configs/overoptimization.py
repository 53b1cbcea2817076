"""Reward over-optimisation (Gao et al. 2022) on the stack's docstring task: proxy reward models and RL against them.

    python -m lmobjective.train --config=configs/overoptimization.py:proxy --workdir=runs/overopt/proxy_large \\
      --config.train.init_from=runs/stack/sft --config.data.sources.pairs.path=runs/overopt/data/pairs_large.jsonl
    python -m lmobjective.train --config=configs/overoptimization.py:ppo --workdir=runs/overopt/ppo_b0.05 \\
      --config.train.init_from=runs/stack/sft --config.rl.reward_model=runs/overopt/proxy_large \\
      --config.data.sources.prompts.path=runs/overopt/data/prompts_train.jsonl \\
      --config.rl.eval_prompts=runs/overopt/data/prompts_heldout.jsonl --config.objective.beta=0.05

(`experiments/overoptimization.sh WORKDIR` writes the data, runs every stage and draws the curves.)
Append ",quick" to the stage for the CPU setting the experiment uses by default.

The gold reward is `rewards.summary_f1`, the word F1 of a response against the docstring summary its
prompt carries; the proxies are reward models fitted to Bradley–Terry pairs labelled by it on SFT
samples. The RL stages (`ppo`, `rloo`) optimise the proxy (`rl.reward_model`, weight 1) and watch the
gold one (`rl.reward_fn`, weight 0: logged on every held-out eval as `val_watched/summary_f1/*`, never
optimised), so their eval lines draw gold and proxy against `val_kl_full_sampled`.
"""

import os

from lmobjective.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("proxy", "ppo", "rloo")
STEPS = {"proxy": (60, 400), "ppo": (30, 200), "rloo": (30, 200)}  # (quick, full)


def get_config(arg: str = "proxy"):
  stage, _, size = arg.partition(",")
  if stage not in STAGES or size not in ("", "quick"):
    raise ValueError(f"configs/overoptimization.py:{arg}: expected one of {', '.join(STAGES)}, optionally ',quick'")
  quick = size == "quick"
  if stage == "proxy":
    c = load_config_file(os.path.join(HERE, "reward_model.py"))  # a preference_jsonl source 'pairs'
    c.data.sources.pairs.val_fraction = 0.1
    c.optimizer.learning_rate = 5e-4  # the stack's reward model's
  else:
    c = load_config_file(os.path.join(HERE, f"stack.py:{stage}"))  # gold watched, the reward model optimised
    c.rl.max_new_tokens, c.rl.eval_samples = 32, 2
    c.train.batch_size = 8 if quick else 16
    c.eval.every_steps = 10 if quick else 25  # 4 (quick) or 9 points per curve (Gao et al.'s forms have 2 coefficients)
    if stage == "ppo":
      c.rl.vf_coef = 0.5  # the stack's 0.1 left the critic explaining nothing (docs/objectives.md)
  c.train.steps = STEPS[stage][0 if quick else 1]
  c.checkpoint.every_steps = c.eval.every_steps
  return c
