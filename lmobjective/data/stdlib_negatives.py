"""Rejected responses for `stdlib_pairs`: five kinds of bad answer, mixed with seeded shares per pair.

Three are the right summary damaged the ways language models damage text, so the fault is in the
response itself (what a small model can learn to see, and what preference data is collected for):
* `corrupted`: one content word (4+ letters, not a stop word) replaced by a content word of
  another summary: right form, wrong meaning.
* `swapped`: two of its content words exchanged: the same words, the wrong relation.
* `repeated`: a run of n = 2–4 of its words said again in place of the n words that follow: the
  degenerate repetition of greedy decoding (which a language model finds likely).
These keep the response's length in words, so a pair's log-probs differ by what was said, not by how much.
Two are another function's summary, so they can be told apart only by reading the prompt:
* `hard`: the summary of another function of the same module or with the same name elsewhere
  (`json.dumps` vs `pickle.dumps`): on topic, wrong function.
* `random`: the summary of a random other function.

`DESIGN` gives the damaged kinds a third each and the prompt-only kinds none (they remain as
fallbacks and for experiments: edit `DESIGN`). Measured on the stack (configs/stack.py, quick):
with 0.2 of each kind, the default model never told `hard` or `random` pairs apart (0.50 held out,
also on its training pairs), and those pairs made DPO fail: its training loss rose above ln 2 and
held-out preference accuracy went 0.602 -> 0.625 (an SFT model's right summary is another pair's
rejected one, so the two kinds of update cancel). With the damaged kinds only, the same DPO stage
lowers its loss to ~0.5 and moves held-out accuracy clearly (docs/objectives.md, "The stack on offline data").

Each pair draws its kind from `DESIGN` with an RNG seeded by the function's name; a kind that has
no candidate (a summary without a content word, or too short to repeat) falls back to the next
of `DESIGN`'s order, so the realised shares (reported) differ slightly from the design. Negatives
come from the same split as the pair (`draw` gets one split), so no held-out summary reaches training.
A rejected response never equals the chosen one.
"""

from __future__ import annotations

import collections
import hashlib
import re

import numpy as np

DESIGN = {"corrupted": 1 / 3, "swapped": 1 / 3, "repeated": 1 / 3, "hard": 0.0, "random": 0.0}
_TRIES = 64
_WORD = re.compile(r"(?<!\w)[A-Za-z]{4,}(?!\w)")  # whole words: not `soon` of `call_soon`
_STOP = frozenset("""about above after again against also been before being below between both could does doing
during each either else every from further have having here however into itself just many more most much must
never only other otherwise over same should some such than that their them then there these they this those
through under until upon very what when where whether which while will with within without would your return
returns given instead""".split())


def _rng(name: str) -> np.random.Generator:
  return np.random.default_rng(int.from_bytes(hashlib.sha256(f"stdlib_negatives\0{name}".encode()).digest()[:8], "big"))


def _content_spans(text: str) -> list[tuple[int, int]]:
  return [m.span() for m in _WORD.finditer(text) if m.group().lower() not in _STOP]


def _cased(word: str, like: str) -> str:
  """`word` with its first letter in the case of `like` (the letter of the slot it goes to)."""
  return (word[0].upper() if like.isupper() else word[0].lower()) + word[1:]


class _Pool:
  """One split's tasks, indexed by module and by last name component."""

  def __init__(self, tasks):
    self.tasks = tasks
    self.near = collections.defaultdict(set)
    for i, t in enumerate(tasks):
      self.near["module:" + t.module].add(i)
      self.near["name:" + t.name.rsplit(".", 1)[-1]].add(i)
    self.spans = [_content_spans(t.summary) for t in tasks]

  def hard(self, i: int, rng) -> str | None:
    t = self.tasks[i]
    near = self.near["module:" + t.module] | self.near["name:" + t.name.rsplit(".", 1)[-1]]
    options = [self.tasks[j].summary for j in sorted(near) if self.tasks[j].summary != t.summary]
    return options[rng.integers(len(options))] if options else None

  def random(self, i: int, rng) -> str | None:
    for _ in range(_TRIES):
      other = self.tasks[rng.integers(len(self.tasks))].summary
      if other != self.tasks[i].summary:
        return other
    return None

  def corrupted(self, i: int, rng) -> str | None:
    text, spans = self.tasks[i].summary, self.spans[i]
    if not spans:
      return None
    start, end = spans[rng.integers(len(spans))]
    for _ in range(_TRIES):
      j = rng.integers(len(self.tasks))
      words = [self.tasks[j].summary[a:b] for a, b in self.spans[j]]
      words = [w for w in words if w.lower() != text[start:end].lower()]
      if words:
        word = words[rng.integers(len(words))]
        return text[:start] + _cased(word, text[start]) + text[end:]
    return None


  def swapped(self, i: int, rng) -> str | None:
    text, spans = self.tasks[i].summary, self.spans[i]
    pairs = [(x, y) for x in range(len(spans)) for y in range(x + 1, len(spans))
             if text[slice(*spans[x])].lower() != text[slice(*spans[y])].lower()]
    if not pairs:
      return None
    (a0, a1), (b0, b1) = (spans[k] for k in pairs[rng.integers(len(pairs))])
    return text[:a0] + _cased(text[b0:b1], text[a0]) + text[a1:b0] + _cased(text[a0:a1], text[b0]) + text[b1:]

  def repeated(self, i: int, rng) -> str | None:
    words = self.tasks[i].summary.split(" ")
    n = int(rng.integers(2, 5))
    if len(words) < 2 * n:
      n = len(words) // 2
    if n < 2:
      return None
    start = int(rng.integers(len(words) - 2 * n + 1))
    stutter = words[:start + n] + words[start:start + n] + words[start + 2 * n:]
    return " ".join(stutter) if stutter != words else None


def draw(tasks) -> tuple[list[str | None], list[str | None]]:
  """(rejected response, its kind) per task of one split; (None, None) where no kind has a candidate."""
  pool, kinds = _Pool(tasks), tuple(DESIGN)
  cum = np.cumsum(list(DESIGN.values()))
  rejected, used = [], []
  for i, t in enumerate(tasks):
    rng = _rng(t.name)
    first = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(kinds) - 1)
    r, kind = None, None
    for k in kinds[first:] + kinds[:first]:
      r = getattr(pool, k)(i, rng)
      if r is not None:
        kind = k
        break
    rejected.append(r)
    used.append(kind)
  return rejected, used


def shares(kinds: list[str]) -> dict:
  """The info `stats()` reports: the design and the realised shares and counts of the given pairs."""
  counts = {k: sum(x == k for x in kinds) for k in DESIGN}
  return {"negative_design": dict(DESIGN), "negative_counts": counts,
          "negative_shares": {k: c / max(len(kinds), 1) for k, c in counts.items()}}
