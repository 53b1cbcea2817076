"""Config loading and the pieces of validation: `ConfigError` and the `require_*` checks.

The one validator that uses them is `lmobjective.validation.validate(config)`. Library code never
reads undeclared keys and never mutates the config. A bad value stops the run with one line that
names the key and what is allowed (`ConfigError`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Iterable

import ml_collections


class ConfigError(ValueError):
  """A bad config value. `str(err)` is one line naming the key: 'config.train.steps=-1: must be ...'."""

  def __init__(self, key: str, value: Any, allowed: str):
    self.key, self.value, self.allowed = key, value, allowed
    super().__init__(f"config.{key}={value!r}: {allowed}")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> its `get_config(arg)`, the way `--config=` reads it (for notebooks)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(
      "lmobjective_config_" + os.path.splitext(os.path.basename(path))[0], path)
  if module_spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"config file not found: {path}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def base_config(preset_file: str, base: str = "default.py", arg: str | None = None):
  """For presets: the config of a sibling file, independent of the working directory."""
  path = os.path.join(os.path.dirname(os.path.abspath(preset_file)), base)
  return load_config_file(path + (f":{arg}" if arg else ""))


def max_len(cfg: ml_collections.ConfigDict) -> int:
  """The longest context the model supports: model.max_len, or data.context_length when unset."""
  return cfg.model.max_len if cfg.model.max_len is not None else cfg.data.context_length


def decay_steps(cfg: ml_collections.ConfigDict) -> int:
  """Steps of warmup + decay: optimizer.decay_steps, or train.steps when unset."""
  return cfg.optimizer.decay_steps if cfg.optimizer.decay_steps is not None else cfg.train.steps


def get(cfg: ml_collections.ConfigDict, key: str) -> Any:
  node = cfg
  for part in key.split("."):
    node = node[part]
  return node


def require_int(cfg, key: str, lo: int | None = None, hi: int | None = None, allow_none=False) -> None:
  v = get(cfg, key)
  if v is None and allow_none:
    return
  if isinstance(v, bool) or not isinstance(v, int):
    raise ConfigError(key, v, "must be an integer")
  if (lo is not None and v < lo) or (hi is not None and v > hi):
    raise ConfigError(key, v, f"must be in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]")


def require_float(cfg, key: str, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False) -> None:
  v = get(cfg, key)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise ConfigError(key, v, "must be a finite number")
  if lo is not None and (v < lo or (lo_open and v == lo)):
    raise ConfigError(key, v, f"must be {'>' if lo_open else '>='} {lo}")
  if hi is not None and v > hi:
    raise ConfigError(key, v, f"must be <= {hi}")


def require_choice(cfg, key: str, choices: Iterable[str]) -> None:
  v = get(cfg, key)
  choices = tuple(choices)
  if v not in choices:
    raise ConfigError(key, v, f"must be one of {', '.join(choices)}")
