"""Reward-model stage: a score head fitted to preference pairs by Bradley–Terry, from an SFT (or any) run.

    python -m lmobjective.train --config=configs/reward_model.py --workdir=runs/rm \\
      --config.train.init_from=runs/sft --config.data.sources.pairs.path=pairs.jsonl \\
      [--config.objective.center_rewards_coefficient=0.01]

Lines are {"prompt", "chosen", "rejected"}, as for DPO (`train.batch_size` and `eval.batch_size` count
pairs). The run logs TRL's accuracy, margin and {min,mean,max}_reward; afterwards
`lmobjective.restore("runs/rm").reward(prompts, completions)` scores text, and an RL stage uses it
with `--config.rl.reward_model=runs/rm` (docs/objectives.md, "Reward model").
"""

import os

from lmobjective.config import load_config_file


def get_config(arg: str | None = None):
  # DPO's preset (a preference_jsonl source "pairs", its sizes and schedule) with the reward model's objective.
  dpo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpo.py")
  c = load_config_file(dpo + (f":{arg}" if arg else ""))
  c.objective.kind = "reward_model"
  return c
