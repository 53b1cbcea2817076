"""Preference stage: DPO on pairs of responses, from an SFT (or any) run, which is also the frozen reference.

    python -m lmobjective.train --config=configs/dpo.py --workdir=runs/dpo \\
      --config.train.init_from=runs/sft --config.data.sources.pairs.path=pairs.jsonl \\
      [--config.objective.kind=ipo|simpo --config.objective.beta=... --config.objective.simpo_gamma=...]

Lines are {"prompt", "chosen", "rejected"} (plain strings, or chat messages rendered with the SFT
template). `train.batch_size` and `eval.batch_size` count pairs.
"""

import ml_collections

from lmobjective.config import base_config


def get_config(arg: str | None = None):
  c = base_config(__file__, arg=arg)
  pairs = c.data.sources.code
  pairs.kind, pairs.weight, pairs.val_fraction = "preference_jsonl", 1.0, 0.1
  c.data.sources = ml_collections.ConfigDict({"pairs": pairs})
  c.objective.kind = "dpo"
  c.objective.beta = 0.1
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
