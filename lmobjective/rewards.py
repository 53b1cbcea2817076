"""Rewards: the functions an RL stage maximises, named by config, called on a batch of completions.

`rl.reward_fn` names one or more functions, comma-separated: `path/to/file.py:function` (a file,
relative to the current directory) or `package.module:function` (an importable module).
`rl.reward_weights` is "" (every weight 1.0) or one number per function. A reward model
(`rl.reward_model`, `run/scorer.py`) joins them as one more term, named `reward_model`, last in the
weights: its values are computed on the device from the sampled ids and passed in (`precomputed`).

Each function is called as `fn(prompts=..., completions=..., **fields)`, where `fields` are the prompt
records' other keys, one list per key (so `exact_answer` below receives `answer=[...]`). It returns N
numbers, one per completion, or None where it does not apply. The reward of completion i is
sum_f w_f * r_f,i over the functions that apply to it; a completion no function applies to, a NaN, an
inf, a non-number or a wrong length stop the run with one line naming the function (`RewardError`):
a silent NaN would poison every advantage in its group.

Legend: F = reward functions, N = completions.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import re
import sys
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from lmobjective.config import ConfigError

SPEC_KEY, WEIGHTS_KEY = "rl.reward_fn", "rl.reward_weights"
_FORMS = "entries must be 'path/to/file.py:function' or 'package.module:function', comma-separated"
_RESERVED = ("prompts", "completions")  # the keywords every function receives itself


class RewardError(ValueError):
  """A reward function misbehaved: `str(err)` is one line naming it (as in the spec) and what is wrong."""


class Scored(NamedTuple):
  rewards: np.ndarray  # float64 [N]: the weighted sum over the functions that apply
  per_function: np.ndarray  # float64 [F, N]: each function's value, NaN where it returned None
  names: tuple[str, ...]  # [F]: metric names, unique


@dataclasses.dataclass(frozen=True, eq=False)
class Rewards:
  """The loaded functions; call it on a batch to score it."""
  fns: tuple[Callable, ...]
  weights_F: np.ndarray
  names: tuple[str, ...]  # metric names (`__name__`, made unique), the precomputed terms' last
  entries: tuple[str, ...]  # as written in the spec (then the precomputed terms' keys): what errors name
  precomputed: tuple[str, ...] = ()  # terms computed elsewhere (a reward model), passed to __call__ by name

  def __call__(self, prompts: list, completions: list[str], fields: dict[str, list],
               precomputed: dict[str, np.ndarray] | None = None) -> Scored:
    n = len(completions)
    _check_inputs(prompts, n, fields)
    per = [_call(fn, e, prompts, completions, fields) for fn, e in zip(self.fns, self.entries)]
    for name, entry in zip(self.precomputed, self.entries[len(self.fns):]):
      per.append(_precomputed(name, entry, (precomputed or {}).get(name), n))
    per_FxN = np.stack(per)
    unscored = np.flatnonzero(np.isnan(per_FxN).all(axis=0))
    if unscored.size:
      raise RewardError(f"no reward for completion {unscored[0]}: every reward function "
                        f"({', '.join(self.entries)}) returned None for it")
    rewards_N = np.nansum(self.weights_F[:, None] * per_FxN, axis=0)
    return Scored(rewards_N, per_FxN, self.names)


def load(spec: str, weights: str, precomputed: dict[str, str] | None = None) -> Rewards:
  """The functions of `rl.reward_fn` with the weights of `rl.reward_weights` (one-line ConfigError), and
  the `precomputed` terms ({metric name: the config key that names it}, e.g. a reward model's) after them."""
  precomputed = precomputed or {}
  if (not spec or not spec.strip()) and not precomputed:
    raise ConfigError(SPEC_KEY, spec, f"names no reward function ({_FORMS})")
  entries = tuple(e.strip() for e in spec.split(",")) if spec and spec.strip() else ()
  fns = tuple(_load_one(spec, i, entry) for i, entry in enumerate(entries))
  weights_F = _weights(weights, entries + tuple(precomputed.values()))
  names = _unique([getattr(fn, "__name__", None) or e.rpartition(":")[2] for fn, e in zip(fns, entries)]
                  + list(precomputed))
  return Rewards(fns, weights_F, names, entries + tuple(precomputed.values()), tuple(precomputed))


def metrics(scored: Scored) -> dict[str, float]:
  """`rewards/<name>/mean` and `rewards/<name>/std` (ddof 0) over the rows where each function applied."""
  out = {}
  for name, row_N in zip(scored.names, scored.per_function):
    applied = row_N[~np.isnan(row_N)]
    if applied.size:
      out[f"rewards/{name}/mean"] = float(np.mean(applied))
      out[f"rewards/{name}/std"] = float(np.std(applied))
  return out


def exact_answer(prompts, completions, answer, **_) -> list[float]:
  """1.0 where the completion, stripped of surrounding whitespace, is the answer string, else 0.0."""
  return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]


_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
  """Lower-cased alphanumeric runs: SQuAD's normalisation without its article rule (docstrings keep "a")."""
  return _WORD.findall(text.lower())


def summary_f1(prompts, completions, summary, **_) -> list[float]:
  """Word-level F1 (SQuAD's, over multisets of `words`) of each completion against its reference `summary`
  (the stdlib docstring task's prompts carry it): a graded score in [0, 1], 0 for an empty side."""
  out = []
  for c, s in zip(completions, summary):
    got, want = collections.Counter(words(c)), collections.Counter(words(str(s)))
    common = sum((got & want).values())
    out.append(0.0 if not common else 2 * common / (sum(got.values()) + sum(want.values())))
  return out


def _load_one(spec: str, i: int, entry: str) -> Callable:
  target, colon, attr = entry.rpartition(":")
  if not entry:
    raise ConfigError(SPEC_KEY, spec, f"entry {i + 1} is empty ({_FORMS})")
  if not colon or not target or not attr:
    raise ConfigError(SPEC_KEY, spec, f"'{entry}' has no ':function' ({_FORMS})")
  module = _module(spec, target)
  if not hasattr(module, attr):
    raise ConfigError(SPEC_KEY, spec, f"{target} has no attribute '{attr}'")
  fn = getattr(module, attr)
  if not callable(fn):
    raise ConfigError(SPEC_KEY, spec, f"{target}:{attr} is not callable (type {type(fn).__name__})")
  return fn


def _is_file(target: str) -> bool:
  return target.endswith(".py") or "/" in target or os.sep in target


def _module(spec: str, target: str):
  try:
    if not _is_file(target):
      return importlib.import_module(target)
    return _file_module(spec, target)
  except ConfigError:
    raise
  except Exception as e:  # the user's module: any error it raises while importing
    raise ConfigError(SPEC_KEY, spec, f"{target} failed to import ({type(e).__name__}: {_first_line(e)})") from e


def _file_module(spec: str, target: str):
  path = os.path.abspath(os.path.expanduser(target))
  if not os.path.isfile(path):
    raise ConfigError(SPEC_KEY, spec, f"{target}: no such file (relative paths start at {os.getcwd()})")
  # A name per absolute path: two files with the same stem stay two modules. Registered in sys.modules
  # as `import` would do (dataclasses and pickle look modules up there), and removed if it fails.
  name = f"lmobjective_reward_{hashlib.sha256(path.encode()).hexdigest()[:12]}"
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module
  try:
    module_spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


def _weights(weights: str, entries: tuple[str, ...]) -> np.ndarray:
  if not weights or not weights.strip():
    return np.ones(len(entries))
  parts = [w.strip() for w in weights.split(",")]
  try:
    values = [float(w) for w in parts]
  except ValueError:
    bad = next(w for w in parts if not _is_float(w))
    raise ConfigError(WEIGHTS_KEY, weights, f"must be comma-separated numbers ('{bad}' is not a number)") from None
  if not all(math.isfinite(v) for v in values):
    bad = next(w for w, v in zip(parts, values) if not math.isfinite(v))
    raise ConfigError(WEIGHTS_KEY, weights, f"must be finite numbers (got {bad})")
  if len(values) != len(entries):
    raise ConfigError(WEIGHTS_KEY, weights, f"has {len(values)} weights for {len(entries)} rewards "
                      f"({', '.join(entries)}): one per reward, or \"\" for all 1.0")
  return np.array(values, np.float64)


def _is_float(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def _unique(names: list[str]) -> tuple[str, ...]:
  out = []
  for name in names:
    k, unique = 1, name
    while unique in out:
      k += 1
      unique = f"{name}_{k}"
    out.append(unique)
  return tuple(out)


def _check_inputs(prompts: list, n: int, fields: dict[str, list]) -> None:
  """The caller's batch (not a reward function's fault): plain ValueError."""
  if len(prompts) != n:
    raise ValueError(f"rewards: {len(prompts)} prompts for {n} completions (one prompt per completion)")
  for k, v in fields.items():
    if k in _RESERVED:
      raise ValueError(f"rewards: a field named '{k}' would clash with the reward functions' own keyword")
    if len(v) != n:
      raise ValueError(f"rewards: field '{k}' has {len(v)} values for {n} completions")


def _call(fn: Callable, entry: str, prompts: list, completions: list[str], fields: dict[str, list]) -> np.ndarray:
  """fn's values as float64 [N], NaN where it returned None."""
  try:
    out = fn(prompts=prompts, completions=completions, **fields)
  except Exception as e:
    raise RewardError(f"reward function {entry} raised {type(e).__name__}: {_first_line(e)}") from e
  values = _as_sequence(out, entry)
  n = len(completions)
  if len(values) != n:
    raise RewardError(f"reward function {entry} returned {len(values)} values, expected {n} (one per completion)")
  return np.array([_number(v, entry, i) for i, v in enumerate(values)], np.float64).reshape(n)


def _precomputed(name: str, entry: str, values, n: int) -> np.ndarray:
  if values is None:
    raise ValueError(f"rewards: the {name} term ({entry}) was not passed")
  values = np.asarray(values, np.float64).reshape(-1)
  if len(values) != n or not np.isfinite(values).all():
    bad = "wrong length" if len(values) != n else f"{values[~np.isfinite(values)][0]} at row {np.flatnonzero(~np.isfinite(values))[0]}"
    raise RewardError(f"{entry} gave {bad} (rewards must be finite, one per completion)")
  return values


def _as_sequence(out: Any, entry: str) -> Sequence:
  if hasattr(out, "__array__") and not isinstance(out, (str, bytes)):
    array = np.asarray(out)
    if array.ndim != 1:
      raise RewardError(f"reward function {entry} returned an array of shape {array.shape}, "
                        "not one value per completion")
    return array.tolist()  # numpy scalars -> Python numbers, checked below
  if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
    raise RewardError(f"reward function {entry} returned a {type(out).__name__}, not a sequence "
                      "(a list with one number or None per completion)")
  return out


def _number(v: Any, entry: str, i: int) -> float:
  if v is None:
    return math.nan
  if isinstance(v, np.bool_):
    v = bool(v)
  if not isinstance(v, numbers.Real):
    raise RewardError(f"reward function {entry} returned a {type(v).__name__} at row {i} ({v!r:.40}), "
                      "not a number or None")
  if not math.isfinite(v):
    raise RewardError(f"reward function {entry} returned {v} at row {i} (rewards must be finite; None means "
                      "not applicable)")
  return float(v)


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else "(no message)"
