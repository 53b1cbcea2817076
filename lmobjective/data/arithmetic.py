"""Arithmetic: multi-digit addition, an offline task whose every answer a program can check.

A problem is a pair (a, b) of integers uniform in [0, 10**num_digits); its prompt is "a+b=" and its
answer str(a + b). The task is verifiable: `rewards.exact_answer` compares a completion with the
answer, no model or person judges it, so an RL stage's reward is exact, and held-out accuracy measures
the skill rather than a judge's taste.

Split: a pair is held out iff a fixed hash of its unordered operands {a, b} falls below
HELDOUT_SHARE. The rule belongs to the pair alone, not to the seed, the sizes or num_digits: no pair
is in both splits under any arguments, and neither is its swap (b, a), which commutativity would give
away. Pairs come from `np.random.default_rng([seed, num_digits])` without repeats and are dealt to
their split until both are full, so `problems` is a pure function of its arguments. Spaces of at most
10**6 pairs (num_digits <= 3) are walked in a seeded permutation, so a request for more pairs than a
split holds is refused exactly.

`write_task` writes the four files a pretrain -> SFT -> RL study needs; only train problems reach the
first three (pretrain.jsonl: kind `jsonl`, text_field "text"; sft.jsonl: kind `chat_jsonl`;
prompts_train.jsonl and prompts_heldout.jsonl: kind `prompts_jsonl`, with an `answer` field).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator

import numpy as np

from lmobjective import files

HELDOUT_SHARE = 0.1  # of all pairs; the held-out split samples from this share only
MAX_DIGITS = 18  # operands stay int64 when drawn
_ENUMERATE = 10**6  # spaces this small are walked whole (exact refusal of too-large requests)
_BATCH = 4096  # pairs drawn at a time from large spaces
Pair = tuple[int, int]


def problems(num_digits: int, seed: int, num_train: int = 20000, num_heldout: int = 200
             ) -> tuple[list[Pair], list[Pair]]:
  """(train, heldout): distinct (a, b) pairs in the order drawn; no pair (or its swap) in both."""
  _check(num_digits, seed, num_train, num_heldout)
  train, heldout, seen = [], [], [0, 0]  # seen: pairs of each split met, kept or not
  for a, b in _distinct_pairs(num_digits, seed):
    held = is_heldout(a, b)
    side, size = (heldout, num_heldout) if held else (train, num_train)
    seen[held] += 1
    if len(side) < size:
      side.append((a, b))
    if len(train) == num_train and len(heldout) == num_heldout:
      return train, heldout
  raise ValueError(f"{num_digits}-digit addition has {seen[0]} train and {seen[1]} held-out pairs: "
                   f"num_train={num_train}, num_heldout={num_heldout} ask for more")


def is_heldout(a: int, b: int) -> bool:
  """Whether (a, b) belongs to the held-out split: a hash of the unordered operands, seed-free."""
  lo, hi = sorted((a, b))
  digest = hashlib.sha256(f"arithmetic\0{lo}+{hi}".encode()).digest()
  return int.from_bytes(digest[:8], "big") < HELDOUT_SHARE * 2.0**64


def prompt_text(a: int, b: int) -> str:
  return f"{a}+{b}="


def answer(a: int, b: int) -> str:
  return str(a + b)


def pretrain_record(a: int, b: int) -> dict:
  """{"text": "12+34=46"}: a `jsonl` source's record."""
  return {"text": prompt_text(a, b) + answer(a, b)}


def sft_record(a: int, b: int) -> dict:
  """A `chat_jsonl` record: the user asks "12+34=", the assistant answers "46"."""
  return {"messages": [{"role": "user", "content": prompt_text(a, b)},
                       {"role": "assistant", "content": answer(a, b)}]}


def prompt_record(a: int, b: int) -> dict:
  """A `prompts_jsonl` record: the chat prompt and its `answer` (the keyword `exact_answer` reads)."""
  return {"prompt": [{"role": "user", "content": prompt_text(a, b)}], "answer": answer(a, b)}


def write_task(directory: str, num_digits: int = 3, num_train: int = 20000, num_heldout: int = 200,
               seed: int = 0) -> dict[str, str]:
  """Writes pretrain.jsonl, sft.jsonl, prompts_train.jsonl, prompts_heldout.jsonl (each atomically);
  returns their paths by name ("pretrain", "sft", "prompts_train", "prompts_heldout")."""
  train, heldout = problems(num_digits, seed, num_train, num_heldout)
  records = {"pretrain": [pretrain_record(a, b) for a, b in train],
             "sft": [sft_record(a, b) for a, b in train],
             "prompts_train": [prompt_record(a, b) for a, b in train],
             "prompts_heldout": [prompt_record(a, b) for a, b in heldout]}
  paths = {}
  for name, recs in records.items():
    paths[name] = os.path.join(directory, f"{name}.jsonl")
    files.atomic_write(paths[name], "".join(json.dumps(r) + "\n" for r in recs))
  return paths


def _check(num_digits: int, seed: int, num_train: int, num_heldout: int) -> None:
  if not 1 <= num_digits <= MAX_DIGITS:
    raise ValueError(f"num_digits={num_digits}: must be in [1, {MAX_DIGITS}]")
  if seed < 0:
    raise ValueError(f"seed={seed}: must be >= 0")
  if num_train < 0 or num_heldout < 0:
    raise ValueError(f"num_train={num_train}, num_heldout={num_heldout}: must be >= 0")
  space = 100**num_digits
  if space > _ENUMERATE and (num_heldout > HELDOUT_SHARE * space / 2 or num_train > (1 - HELDOUT_SHARE) * space / 2):
    # Drawn with repeats, a split more than half full would take ever longer to fill.
    raise ValueError(f"num_train={num_train}, num_heldout={num_heldout}: more than half of a split of "
                     f"{num_digits}-digit addition ({space} pairs, {HELDOUT_SHARE:.0%} held out)")


def _distinct_pairs(num_digits: int, seed: int) -> Iterator[Pair]:
  """Uniform pairs without repeats: a permutation of a small space, else draws with repeats skipped."""
  rng = np.random.default_rng([seed, num_digits])
  base = 10**num_digits
  if base * base <= _ENUMERATE:
    for k in rng.permutation(base * base).tolist():
      yield divmod(k, base)
    return
  seen = set()
  while True:
    for a, b in rng.integers(0, base, size=(_BATCH, 2), dtype=np.int64).tolist():
      if (a, b) not in seen:
        seen.add((a, b))
        yield a, b
