"""A K-candidate bandit for reward maximisation with a known optimum (offline, generated).

One prompt, "x"; a response is one token (rl.max_new_tokens = 1). `pretraining_text` teaches a
model that "x" is followed by one of the candidates a, b, c, d (uniformly); `reward` scores every
vocabulary id: REWARDS for the candidates, OTHER for everything else (a response that decodes to
anything but one candidate). So the reference's next-token distribution after the prompt and the
reward table over the whole vocabulary (`reward_table`) give the exact fixed point of each
objective (`analysis/fixed_points.py`), which the RL loop must reach (`experiments/rl_fixed_points.py`).
"""

from __future__ import annotations

import json

import numpy as np

from lmobjective import files

PROMPT = "x"
REWARDS = {"a": 0.0, "b": 0.7, "c": -0.5, "d": 1.3}
OTHER = -1.0
REWARD_FN = "lmobjective.data.bandit:reward"  # rl.reward_fn


def reward(prompts, completions, **_) -> list[float]:
  """REWARDS of a candidate, OTHER of any other completion."""
  return [REWARDS.get(c, OTHER) for c in completions]


def pretraining_text(lines: int = 2000, seed: int = 0) -> str:
  """Lines "x" + a uniformly drawn candidate."""
  rng = np.random.default_rng(seed)
  cands = list(REWARDS)
  return "".join(PROMPT + cands[rng.integers(len(cands))] + "\n" for _ in range(lines))


def prompts_jsonl(copies: int = 8) -> str:
  """A prompts_jsonl file of the one prompt, `copies` times (a batch takes several per iteration)."""
  return "".join(json.dumps({"prompt": PROMPT}) + "\n" for _ in range(copies))


def write(directory: str, lines: int = 2000, copies: int = 8, seed: int = 0) -> dict[str, str]:
  """pre.txt (a `text` source) and prompts.jsonl under `directory`; their paths by name."""
  import os
  paths = {"text": os.path.join(directory, "pre.txt"), "prompts": os.path.join(directory, "prompts.jsonl")}
  files.atomic_write(paths["text"], pretraining_text(lines, seed))
  files.atomic_write(paths["prompts"], prompts_jsonl(copies))
  return paths


def reward_table(vocab_size: int, tokenizer) -> np.ndarray:
  """float64 [V]: the reward of every id as a one-token completion (decoded, as the loop decodes it)."""
  return np.array([REWARDS.get(tokenizer.decode([i]), OTHER) for i in range(vocab_size)], np.float64)
