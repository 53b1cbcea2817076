"""The bandit of `lmobjective/data/bandit.py` as tiny runs shared by the RL tests.

The origin is a tiny model pretrained (byte tokenizer) on lines "x" + a uniformly drawn candidate,
so after the prompt [EOS, "x"] its next-token distribution favours the candidates. The RL stage
samples one token (rl.max_new_tokens = 1: every response is truncated, none is masked) and the
bandit's reward scores every vocabulary id, so π* ∝ π_ref·exp(r/β) is exact over the vocabulary.
"""

import json

from _stages import stage_config
from lmobjective.data import bandit


def write_bandit(d, lines: int = 2000, prompts: int = 8, seed: int = 0) -> dict:
  return bandit.write(str(d), lines, prompts, seed)


def origin_config(cache, paths, steps: int = 60):
  return stage_config(cache, "text", paths["text"], **{
      "data.tokenizer.kind": "byte", "train.steps": steps, "eval.num_batches": 0, "checkpoint.every_steps": 0})


def rl_config(cache, paths, origin: str, **overrides):
  """RLOO on the bandit from `origin`; `overrides` are dotted keys."""
  return stage_config(cache, "prompts_jsonl", paths["prompts"], source_fields={"val_fraction": 0.0}, **{
      "data.tokenizer.kind": "byte", "train.init_from": origin, "objective.kind": "rloo", "objective.beta": 0.5,
      "rl.max_new_tokens": 1, "rl.num_generations": 4, "train.batch_size": 4, "train.steps": 4,
      "rl.reward_fn": bandit.REWARD_FN, "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 0,
      "checkpoint.every_steps": 1, "checkpoint.keep": 10, "eval.num_batches": 0, **overrides})


def config_file(path, config) -> str:
  """A config file holding `config` (for the CLI)."""
  path.write_text("import json, ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict("
                  f"json.loads({config.to_json()!r}))\n")
  return str(path)
