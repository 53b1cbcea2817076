"""Config boundary: validate the ml_collections config once, then convert to frozen dataclasses.

Library code never reads undeclared keys and never mutates the config. A bad value stops
the run with one line that names the key and what is allowed (`ConfigError`).
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


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks every non-data key; data keys are checked by `lmobjective.data.validate`."""
  require_int(cfg, "seed", 0)
  require_int(cfg, "train.steps", 0)
  require_int(cfg, "train.batch_size", 1)
  require_int(cfg, "train.grad_accum_steps", 1)
  if cfg.train.batch_size % cfg.train.grad_accum_steps:
    raise ConfigError("train.grad_accum_steps", cfg.train.grad_accum_steps,
                      f"must divide train.batch_size={cfg.train.batch_size}")
  require_int(cfg, "train.log_every_steps", 1)
  require_int(cfg, "data.context_length", 1)
  _validate_model(cfg)
  require_float(cfg, "objective.z_loss", 0.0)
  require_int(cfg, "objective.loss_chunk_size", 0)
  _validate_optimizer(cfg)
  require_int(cfg, "eval.every_steps", 1)
  require_int(cfg, "eval.num_batches", 0)
  require_int(cfg, "eval.batch_size", 1)
  require_int(cfg, "checkpoint.every_steps", 1)
  require_int(cfg, "checkpoint.keep", 1)
  for axis in ("data", "fsdp", "tensor"):
    v = cfg.mesh[axis]
    if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
      raise ConfigError(f"mesh.{axis}", v, "must be a positive integer or -1 (the rest of the devices)")
  if cfg.data.context_length > max_len(cfg):
    raise ConfigError("data.context_length", cfg.data.context_length,
                      f"must be <= model.max_len={max_len(cfg)} (the longest context the model supports)")


def _validate_model(cfg) -> None:
  m = cfg.model
  require_int(cfg, "model.num_layers", 1)
  require_int(cfg, "model.num_heads", 1)
  require_int(cfg, "model.embed_dim", 1)
  if m.embed_dim % m.num_heads:
    raise ConfigError("model.embed_dim", m.embed_dim, f"must be divisible by model.num_heads={m.num_heads}")
  if m.position == "rope" and (m.embed_dim // m.num_heads) % 2:
    raise ConfigError("model.embed_dim", m.embed_dim,
                      f"embed_dim/num_heads={m.embed_dim // m.num_heads} must be even for rope positions")
  require_int(cfg, "model.num_kv_heads", 1, allow_none=True)
  if m.num_kv_heads is not None and m.num_heads % m.num_kv_heads:
    raise ConfigError("model.num_kv_heads", m.num_kv_heads, f"must divide model.num_heads={m.num_heads}")
  require_int(cfg, "model.mlp_dim", 1, allow_none=True)
  require_int(cfg, "model.max_len", 1, allow_none=True)
  require_int(cfg, "model.vocab_size", 2, allow_none=True)
  require_choice(cfg, "model.position", ("rope", "learned"))
  require_float(cfg, "model.rope_theta", 0.0, lo_open=True)
  require_choice(cfg, "model.norm", ("rmsnorm", "layernorm"))
  require_choice(cfg, "model.mlp", ("swiglu", "gelu"))
  require_float(cfg, "model.dropout", 0.0, 1.0)
  if m.dropout == 1.0:
    raise ConfigError("model.dropout", m.dropout, "must be in [0, 1)")
  require_float(cfg, "model.init_std", 0.0, lo_open=True)
  require_choice(cfg, "model.param_dtype", ("float32", "bfloat16"))
  require_choice(cfg, "model.compute_dtype", ("float32", "bfloat16"))
  require_choice(cfg, "model.attention", ("auto", "xla", "cudnn"))
  require_choice(cfg, "model.remat", ("none", "full", "dots_saveable"))


def _validate_optimizer(cfg) -> None:
  require_float(cfg, "optimizer.learning_rate", 0.0)
  require_float(cfg, "optimizer.end_learning_rate", 0.0)
  require_choice(cfg, "optimizer.schedule", ("cosine", "linear", "constant"))
  require_int(cfg, "optimizer.warmup_steps", 0)
  require_int(cfg, "optimizer.decay_steps", 0, allow_none=True)
  if decay_steps(cfg) < cfg.optimizer.warmup_steps:
    raise ConfigError("optimizer.decay_steps" if cfg.optimizer.decay_steps is not None else "train.steps",
                      decay_steps(cfg),
                      f"must be >= optimizer.warmup_steps={cfg.optimizer.warmup_steps} (it includes warmup)")
  require_float(cfg, "optimizer.b1", 0.0, 1.0)
  require_float(cfg, "optimizer.b2", 0.0, 1.0)
  require_float(cfg, "optimizer.eps", 0.0)
  require_float(cfg, "optimizer.weight_decay", 0.0)
  require_float(cfg, "optimizer.grad_clip", 0.0)
