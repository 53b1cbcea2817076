"""Reward-model stage: a score head fitted to preference pairs by Bradley–Terry, from an SFT (or any) run.

    python -m lmobjective.train --config=configs/reward_model.py --workdir=runs/rm \\
      --config.train.init_from=runs/sft --config.data.sources.pairs.path=pairs.jsonl \\
      [--config.objective.center_rewards_coefficient=0.01]

Lines are {"prompt", "chosen", "rejected"}, as for DPO (`train.batch_size` and `eval.batch_size` count
pairs). The run logs TRL's accuracy, margin and {min,mean,max}_reward; afterwards
`lmobjective.restore("runs/rm").reward(prompts, completions)` scores text, and an RL stage uses it
with `--config.rl.reward_model=runs/rm` (docs/objectives.md, "Reward model").
"""

import ml_collections

from lmobjective.config import base_config


def get_config(arg: str | None = None):
  c = base_config(__file__, arg=arg)
  pairs = c.data.sources.code
  pairs.kind, pairs.weight, pairs.val_fraction = "preference_jsonl", 1.0, 0.1
  c.data.sources = ml_collections.ConfigDict({"pairs": pairs})
  c.objective.kind = "reward_model"
  c.train.steps = 200
  c.train.batch_size = 16  # pairs
  c.optimizer.learning_rate = 1e-4
  c.optimizer.end_learning_rate = 1e-5
  c.optimizer.warmup_steps = 10
  c.optimizer.weight_decay = 0.0
  c.eval.every_steps = 50
  c.eval.batch_size = 32  # pairs
  c.checkpoint.every_steps = 50
  return c
