"""Offline chat and preference tasks from the standard library's docstrings (`stdlib_chat`, `stdlib_pairs`).

A task is a public function or method of a public stdlib module (`stdlib_corpus`'s files, no
component of the module name starting with "_") with an informative docstring summary: the
first sentence of its first paragraph, whitespace normalised, at most `SUMMARY_CHARS` characters.
The user asks about `module.name(signature)` (one of `PHRASINGS`, chosen per function), the
assistant answers with the summary.

Split by module: module m is held out iff `unit_hash("module", m) < val_fraction`
(`heldout_modules`), the same rule for both kinds, so no function or module is in both splits
and the pretraining sources can leave the held-out modules out (`exclude_modules`). A train task
whose summary is also a held-out task's summary is dropped (ntpath/posixpath share docstrings).
Everything is sorted and hashed with a fixed seed: a pure function of the running Python.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import re

import numpy as np

from lmobjective.data import stdlib_corpus, stdlib_negatives

SUMMARY_CHARS = 200
PHRASINGS = ("What does `{sig}` do?",
             "Explain `{sig}` in one sentence.",
             "In one sentence, what is `{sig}` for?",
             "Summarise the docstring of `{sig}`.")
_SENTENCE_END = re.compile(r"(\S*[.!?])\s+(?=[A-Z`'\"(])")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "resp.")
_LONG_SIGNATURE = 100  # longer ones show their defaults as `...`
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)")  # "S.find(sub[, start])": a signature, not a summary
_VACUOUS = re.compile(r"^(deprecated|obsolete|internal|private|helper|undocumented|todo|xxx|not implemented|"
                      r"see |same as|alias|for internal|for backward|for compat|backward|override|overridden)",
                      re.IGNORECASE)
_PROPERTIES = {"property", "cached_property", "abstractproperty", "setter", "getter", "deleter"}


@dataclasses.dataclass(frozen=True)
class Task:
  module: str  # the dotted module name of its file (`stdlib_corpus.module_name`)
  name: str  # qualified: module.function or module.Class.method
  signature: str  # name(args), annotations dropped, self/cls dropped
  summary: str


@functools.lru_cache(maxsize=None)
def code_digest() -> str:
  """sha256 (16 hex) of this module's and stdlib_negatives.py's source: what the records are made by, so
  any edit of either is a new fingerprint and the tokenized and reference caches are rebuilt."""
  h = hashlib.sha256()
  for module in (__file__, stdlib_negatives.__file__):
    with open(module, "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def unit_hash(*parts: str) -> float:
  """A seeded hash of `parts` in [0, 1): the same on every machine and process."""
  digest = hashlib.sha256("\0".join(("stdlib_tasks",) + parts).encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def summary(doc: str) -> str:
  """The first sentence of the docstring's first paragraph, whitespace normalised ('' if uninformative)."""
  text = _first_sentence(" ".join(doc.strip().split("\n\n")[0].split()))
  if (len(text) > SUMMARY_CHARS or len(text.split()) < 3 or text.endswith((":", "...")) or ">>>" in text or "->" in text
      or _SIGNATURE_LINE.match(text) or _VACUOUS.match(text)):
    return ""
  return text


def _first_sentence(text: str) -> str:
  for m in _SENTENCE_END.finditer(text):
    if not m.group(1).lower().endswith(_ABBREVIATIONS):
      return text[:m.end(1)]
  return text


@functools.lru_cache(maxsize=1)
def tasks() -> tuple[Task, ...]:
  """Every task of the running Python, sorted by name (parses the stdlib once per process, ~4 s)."""
  return tasks_of(stdlib_corpus.stdlib_files())


def tasks_of(paths: list[str]) -> tuple[Task, ...]:
  """The tasks of some stdlib files, sorted by name."""
  out = {}
  for path in paths:
    module = stdlib_corpus.module_name(path)
    if any(part.startswith("_") for part in module.split(".")):
      continue
    with open(path, "rb") as f:
      try:
        tree = ast.parse(f.read())
      except (SyntaxError, ValueError):
        continue
    for t in _module_tasks(module, tree):
      out[t.name] = t  # a later definition of the same name wins, as at import time
  return tuple(out[k] for k in sorted(out))


def _module_tasks(module: str, tree: ast.Module) -> list[Task]:
  out = []
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      out += _task(module, f"{module}.{node.name}", node, method=False)
    elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
      for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
          out += _task(module, f"{module}.{node.name}.{item.name}", item, method=True)
  return out


def _decorators(node) -> set[str]:
  return {d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", "") for d in node.decorator_list}


def _task(module: str, name: str, node, method: bool) -> list[Task]:
  decorators = _decorators(node)
  if node.name.startswith("_") or decorators & _PROPERTIES:
    return []
  text = summary(ast.get_docstring(node) or "")
  if not text:
    return []
  return [Task(module, name, f"{name}({_arguments(node, method and 'staticmethod' not in decorators)})", text)]


def _arguments(node, bound: bool) -> str:
  args = ast.arguments(**{f: getattr(node.args, f) for f in node.args._fields})
  for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
    if a is not None:
      a.annotation = None
  if bound and args.posonlyargs:  # self / cls: not part of how the method is called
    args.posonlyargs = args.posonlyargs[1:]
  elif bound and args.args:
    args.args = args.args[1:]
  positional = len(args.posonlyargs) + len(args.args)
  args.defaults = args.defaults[max(0, len(args.defaults) - positional):]  # defaults align with the last ones
  text = ast.unparse(args)
  if len(text) > _LONG_SIGNATURE:
    args.defaults = [ast.Constant(...) for _ in args.defaults]
    args.kw_defaults = [None if d is None else ast.Constant(...) for d in args.kw_defaults]
    text = ast.unparse(args)
  return text


def heldout_modules(val_fraction: float) -> list[str]:
  """The sorted modules whose tasks are validation-only (and which pretraining should leave out)."""
  return sorted({t.module for t in tasks() if unit_hash("module", t.module) < val_fraction})


def split(val_fraction: float) -> tuple[list[Task], list[Task]]:
  """(train, val) tasks: val = the held-out modules' tasks; train loses tasks whose summary is in val."""
  held = set(heldout_modules(val_fraction))
  val = [t for t in tasks() if t.module in held]
  seen = {t.summary for t in val}
  return [t for t in tasks() if t.module not in held and t.summary not in seen], val


def prompt(task: Task) -> str:
  return PHRASINGS[int(unit_hash("phrasing", task.name) * len(PHRASINGS))].format(sig=task.signature)


def conversation(task: Task) -> list[dict]:
  return [{"role": "user", "content": prompt(task)}, {"role": "assistant", "content": task.summary}]


def _cap(train: list, val: list, max_documents: int | None) -> tuple[list, list]:
  """At most max_documents records, each split keeping its share (val at least one), a seeded subset."""
  total = len(train) + len(val)
  if max_documents is None or total <= max_documents:
    return train, val
  n_val = min(len(val), max(1 if val else 0, round(max_documents * len(val) / total)))
  return _subset(train, max_documents - n_val, "train"), _subset(val, n_val, "val")


def _subset(items: list, n: int, which: str) -> list:
  keep = np.argsort([unit_hash("cap", which, str(i)) for i in range(len(items))], kind="stable")[:n]
  return [items[i] for i in np.sort(keep)]


def chat_splits(val_fraction: float, max_documents: int | None) -> tuple[list, list, dict]:
  """`stdlib_chat`: (train, val) conversations and their info."""
  train, val = _cap(*split(val_fraction), max_documents)
  info = {"tasks_code": code_digest(), "heldout_modules": len(heldout_modules(val_fraction))}
  return [conversation(t) for t in train], [conversation(t) for t in val], info


def pair_splits(val_fraction: float, max_documents: int | None) -> tuple[list, list, dict]:
  """`stdlib_pairs`: (train, val) preference pairs (negatives drawn within each split) and their info."""
  train, val, info = kinded_pair_splits(val_fraction, max_documents)
  return [p for p, _ in train], [p for p, _ in val], info


def write_prompts(directory: str, val_fraction: float, max_documents: int | None = None,
                  fits=None, eval_count: int | None = None) -> tuple[dict[str, str], dict[str, int]]:
  """Writes prompts_train.jsonl and prompts_heldout.jsonl (`prompts_jsonl` records, atomically): the
  `stdlib_chat` conversations' user turns, split as they are, each with its task's `summary` (the
  reference answer, a keyword for a reward function) and `name`; `fits(messages) -> bool` drops the
  prompts a sampler could not continue (too long to leave room for the answer). prompts_eval.jsonl
  holds `eval_count` of the held-out prompts evenly spaced through them (every held-out module's
  share, for an RL run's cheaper in-run evals), or all of them. Returns their paths and the number of
  prompts dropped, by name."""
  import json
  import os

  from lmobjective import files
  train, val = _cap(*split(val_fraction), max_documents)
  paths, dropped, kept = {}, {}, {}
  for name, tasks_split in (("prompts_train", train), ("prompts_heldout", val)):
    messages = [[{"role": "user", "content": prompt(t)}] for t in tasks_split]
    kept[name] = [(m, t) for m, t in zip(messages, tasks_split) if fits is None or fits(m)]
    dropped[name] = len(tasks_split) - len(kept[name])
  held = kept["prompts_heldout"]
  n = len(held) if eval_count is None else min(eval_count, len(held))
  kept["prompts_eval"] = [held[i * len(held) // n] for i in range(n)]
  for name, records in kept.items():
    paths[name] = os.path.join(directory, f"{name}.jsonl")
    files.atomic_write(paths[name], "".join(json.dumps({"prompt": m, "summary": t.summary, "name": t.name}) + "\n"
                                            for m, t in records))
  return paths, dropped


def kinded_pair_splits(val_fraction: float, max_documents: int | None) -> tuple[list, list, dict]:
  """`pair_splits` with each pair's negative kind: (train, val) lists of (pair, kind), and the info."""
  by_split, dropped = [], 0
  for tasks_split in split(val_fraction):
    rejected, kinds = stdlib_negatives.draw(tasks_split)
    dropped += sum(r is None for r in rejected)
    by_split.append([({"prompt": [{"role": "user", "content": prompt(t)}], "chosen": t.summary, "rejected": r}, k)
                     for t, r, k in zip(tasks_split, rejected, kinds) if r is not None])
  train, val = _cap(*by_split, max_documents)
  info = {"tasks_code": code_digest(), "heldout_modules": len(heldout_modules(val_fraction)),
          "tasks_without_negative": dropped, **stdlib_negatives.shares([k for _, k in train + val])}
  return train, val, info
