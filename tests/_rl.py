"""A tiny reward-maximisation setup shared by the RL tests: a K-candidate bandit on one prompt.

The origin is a tiny model pretrained (byte tokenizer) on lines "x" + a candidate drawn uniformly,
so after the prompt [EOS, "x"] its next-token distribution favours the candidates. The RL stage
samples one token (rl.max_new_tokens = 1: every response is truncated, none is masked) and
`bandit` rewards every vocabulary id: REWARDS for the candidates, OTHER for every other id. So
the KL-regularised optimum is π* ∝ π_ref·exp(r/β) over the whole vocabulary, computable exactly.
"""

import json
import os

import numpy as np

from _stages import stage_config

REWARDS = {"a": 0.0, "b": 0.7, "c": -0.5, "d": 1.3}
OTHER = -1.0
REWARD_FILE = '''
REWARDS = {rewards!r}


def bandit(prompts, completions, **_):
  return [REWARDS.get(c, {other!r}) for c in completions]


def raises(prompts, completions, **_):
  raise RuntimeError("the grader is down")
'''


def write_bandit(d, lines: int = 2000, prompts: int = 8, seed: int = 0) -> dict:
  """Pretraining text, a prompts file and the reward file under `d`; their paths by name."""
  rng = np.random.default_rng(seed)
  paths = {k: os.path.join(d, f) for k, f in
           (("text", "pre.txt"), ("prompts", "prompts.jsonl"), ("reward", "reward.py"))}
  with open(paths["text"], "w") as f:
    f.writelines("x" + "abcd"[rng.integers(4)] + "\n" for _ in range(lines))
  with open(paths["prompts"], "w") as f:
    f.writelines(json.dumps({"prompt": "x"}) + "\n" for _ in range(prompts))
  with open(paths["reward"], "w") as f:
    f.write(REWARD_FILE.format(rewards=REWARDS, other=OTHER))
  return paths


def origin_config(cache, paths, steps: int = 60):
  return stage_config(cache, "text", paths["text"], **{
      "data.tokenizer.kind": "byte", "train.steps": steps, "eval.num_batches": 0, "checkpoint.every_steps": 0})


def rl_config(cache, paths, origin: str, **overrides):
  """RLOO on the bandit from `origin`; `overrides` are dotted keys."""
  return stage_config(cache, "prompts_jsonl", paths["prompts"], source_fields={"val_fraction": 0.0}, **{
      "data.tokenizer.kind": "byte", "train.init_from": origin, "objective.kind": "rloo", "objective.beta": 0.5,
      "rl.max_new_tokens": 1, "rl.num_generations": 4, "train.batch_size": 4, "train.steps": 4,
      "rl.reward_fn": f"{paths['reward']}:bandit", "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 0,
      "checkpoint.every_steps": 1, "checkpoint.keep": 10, "eval.num_batches": 0, **overrides})


def reward_table(vocab_size: int, tokenizer) -> np.ndarray:
  """[V] the bandit's reward of every id (ids that decode to no candidate get OTHER)."""
  r = np.full(vocab_size, OTHER)
  for c, v in REWARDS.items():
    r[tokenizer.encode(c)[0]] = v
  return r
