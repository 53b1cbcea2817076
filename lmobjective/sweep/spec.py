"""Sweep specs: a spec file -> named runs -> their config overrides (typed like the fields they set).

A spec is a Python file whose `get_sweep(arg)` returns
  {"config": "configs/default.py",          # base config file
   "overrides": {"train.steps": 300},        # applied to every run
   "runs": {"name": {"key": value, ...}}     # named runs, or
   "grid": {"key": [v1, v2], ...}}           # a cartesian product, named from the values
`lmobjective.sweep` plans, launches and resumes the runs.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import os
from typing import Any

import ml_collections

from lmobjective import config as config_lib

FLAG = "--config."


class SweepError(ValueError):
  """A bad sweep spec or override; str() is one line."""


# ---- spec -> runs ------------------------------------------------------------------------------


def load_spec(spec: str) -> dict:
  """`path.py[:arg]` -> its get_sweep(arg), checked."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise SweepError(f"sweep spec not found: {path}")
  try:
    mspec = importlib.util.spec_from_file_location("lmobjective_sweep_" + os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
  except Exception as e:  # a syntax or import error in the spec
    raise SweepError(f"sweep spec {path} does not load: {type(e).__name__}: {e}") from None
  if not hasattr(mod, "get_sweep"):
    raise SweepError(f"sweep spec {path} has no get_sweep(arg) function")
  d = mod.get_sweep(arg or None)
  _check_spec(d, path)
  return d


def _check_spec(d: Any, path: str) -> None:
  if not isinstance(d, dict):
    raise SweepError(f"sweep spec {path}: get_sweep() must return a dict, got {type(d).__name__}")
  extra = set(d) - {"config", "overrides", "runs", "grid", "description"}
  if extra:
    raise SweepError(f"sweep spec {path}: unknown field {sorted(extra)[0]!r} "
                     "(allowed: config, overrides, runs, grid, description)")
  if not isinstance(d.get("config"), str):
    raise SweepError(f"sweep spec {path}: 'config' must name the base config file")
  if ("runs" in d) == ("grid" in d):
    raise SweepError(f"sweep spec {path}: give exactly one of 'runs' or 'grid'")
  if "runs" in d and (not isinstance(d["runs"], dict) or not d["runs"]
                      or not all(isinstance(v, dict) for v in d["runs"].values())):
    raise SweepError(f"sweep spec {path}: 'runs' must be a non-empty dict name -> {{key: value}}")
  if "grid" in d and (not isinstance(d["grid"], dict) or not d["grid"] or not all(
      isinstance(v, (list, tuple)) and v for v in d["grid"].values())):
    raise SweepError(f"sweep spec {path}: 'grid' must be a non-empty dict key -> [values]")
  for name in d.get("runs", {}):
    if not name or not all(ch.isalnum() or ch in "._=-+" for ch in name):
      raise SweepError(f"sweep spec {path}: run name {name!r} must be letters, digits and ._=-+")


def short_keys(keys: list[str]) -> dict[str, str]:
  """Shortest dotted suffix of each key that is unique among them: data.context_length -> context_length."""
  out = {}
  for k in keys:
    parts = k.split(".")
    for n in range(1, len(parts) + 1):
      short = ".".join(parts[-n:])
      if sum(o.split(".")[-n:] == parts[-n:] for o in keys) == 1:
        break
    out[k] = short
  return out


def _value_name(v: Any) -> str:
  return format(v, "g") if isinstance(v, float) else str(v).replace("/", "-").replace(" ", "")


def expand(spec: dict) -> dict[str, dict]:
  """name -> overrides for every run (grid names: 'context_length=64_batch_size=128')."""
  if "runs" in spec:
    return {name: dict(ov) for name, ov in spec["runs"].items()}
  keys = list(spec["grid"])
  short = short_keys(keys)
  runs = {}
  for values in itertools.product(*(spec["grid"][k] for k in keys)):
    name = "_".join(f"{short[k]}={_value_name(v)}" for k, v in zip(keys, values))
    runs[name] = dict(zip(keys, values))
  return runs


# ---- overrides ---------------------------------------------------------------------------------


def format_value(v: Any) -> str:
  if v is None:
    raise SweepError("None cannot be passed as a --config override")
  return repr(v) if isinstance(v, (float, tuple)) else str(v)


def parse_value(text: str, current: Any) -> Any:
  """A command-line override string as the type of the field it replaces."""
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{text!r} is not a bool")
    return text.lower() in ("true", "1")
  if isinstance(current, str) or current is None and not text[:1].isdigit():
    return text
  v = ast.literal_eval(text)
  return float(v) if isinstance(current, float) and isinstance(v, int) else v


def parse_extra(argv: list[str]) -> dict[str, str]:
  """`--config.a.b=v` / `--config.a.b` (a True flag) -> {"a.b": "v"}."""
  out = {}
  for a in argv:
    key, eq, value = a[len(FLAG):].partition("=")
    out[key] = value if eq else "True"
  return out


def apply(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
  node = cfg
  *parents, leaf = key.split(".")
  try:
    for p in parents:
      node = node[p]
    current = node[leaf]
  except (KeyError, AttributeError, TypeError):
    raise SweepError(f"unknown config key: config.{key} (not declared in the config file)") from None
  if isinstance(value, str) and not isinstance(current, str):
    try:
      value = parse_value(value, current)
    except (ValueError, SyntaxError) as e:
      raise SweepError(f"bad value for config.{key}: {e}") from None
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise SweepError(f"bad value for config.{key}={value!r}: {e}") from None


def run_config(base: str, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  cfg = config_lib.load_config_file(base)
  for k, v in overrides.items():
    apply(cfg, k, v)
  return cfg
