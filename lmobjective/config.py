"""Config loading and the pieces of validation: `ConfigError` and the `require_*` checks.

The one validator that uses them is `lmobjective.validation.validate(config)`. Library code never
reads undeclared keys and never mutates the config. A bad value stops the run with one line that
names the key and what is allowed (`ConfigError`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib.util
import json
import math
import os
import types
import typing
from typing import Any, Iterable, Mapping

import ml_collections


# configs/ beside the package: the presets (a source checkout or an editable install). Entry points
# default to it by absolute path, so they work from any directory.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(PROJECT_ROOT, "configs", "default.py")


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


def decay_steps(cfg: ml_collections.ConfigDict, updates_per_step: int = 1) -> int:
  """Updates of warmup + decay: optimizer.decay_steps, or every update of the run when unset
  (train.steps x the objective's `updates_per_step`: several per RL iteration)."""
  return cfg.optimizer.decay_steps if cfg.optimizer.decay_steps is not None else cfg.train.steps * updates_per_step


def wsd_decay_steps(decay_fraction: float, decay_steps: int) -> int:
  """The wsd schedule's final decay: `decay_fraction` of the warmup+decay steps, rounded to a whole step."""
  return int(round(decay_fraction * decay_steps))


def mlp_dim(model) -> int:
  """The MLP width of `config.model`: model.mlp_dim, or when unset 4*embed_dim (gelu, relu2) or
  8/3*embed_dim rounded up to a multiple of 64 (swiglu)."""
  if model.mlp_dim is not None:
    return model.mlp_dim
  return 4 * model.embed_dim if model.mlp != "swiglu" else 64 * -(-(8 * model.embed_dim // 3) // 64)


def norm_eps(model) -> float:
  """The norms' epsilon of `config.model`: model.norm_eps, or when unset 1e-6 (rmsnorm) or 1e-5 (layernorm)."""
  if model.norm_eps is not None:
    return float(model.norm_eps)
  return 1e-6 if model.norm == "rmsnorm" else 1e-5


def set_dotted(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """`cfg.a.b = value` for key "a.b" (what --config.a.b=value does), for scripts that build configs."""
  *parents, leaf = key.split(".")
  node = cfg
  for part in parents:
    node = node[part]
  node[leaf] = value


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


# ---- the typed boundary ------------------------------------------------------------------------
# One frozen dataclass per section, mirroring configs/default.py key for key, with no defaults of
# their own: `typed(config)` fills every field from the (validated) ConfigDict and refuses a
# missing or undeclared key, so the two cannot drift apart silently.


@dataclasses.dataclass(frozen=True)
class MarkovConfig:
  order: int
  num_symbols: int
  concentration: float
  seed: int
  num_documents: int
  document_length: int


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  kind: str
  weight: float
  path: str | None
  text_field: str
  val_fraction: float
  max_documents: int | None
  exclude_modules: str
  markov: MarkovConfig
  only_train_on_assistant: bool
  max_prompt_length: int | None
  max_response_length: int | None


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  kind: str
  model_type: str
  vocab_size: int
  sample_lines: int
  seed: int
  path: str | None


@dataclasses.dataclass(frozen=True)
class DataConfig:
  context_length: int
  packing: str
  document_masking: bool
  cache_dir: str | None
  tokenizer: TokenizerConfig
  sources: Mapping[str, SourceConfig]  # in declaration order
  mixture_stages: str


@dataclasses.dataclass(frozen=True)
class ModelSection:
  """`config.model` as declared (dtypes as names, None = derived); `model.ModelConfig` resolves it."""
  num_layers: int
  num_heads: int
  num_kv_heads: int | None
  embed_dim: int
  head_dim: int | None
  mlp_dim: int | None
  max_len: int | None
  vocab_size: int | None
  position: str
  rope_theta: float
  norm: str
  norm_eps: float | None
  mlp: str
  qk_norm: bool
  use_bias: bool
  attention_bias: str
  mlp_bias: bool
  tie_embeddings: bool
  dropout: float
  init_std: float
  param_dtype: str
  compute_dtype: str
  attention: str
  remat: str
  scan_layers: bool


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  kind: str
  beta: float
  label_smoothing: float
  simpo_gamma: float
  rpo_alpha: float
  z_loss: float
  reference: str
  center_rewards_coefficient: float
  loss_chunk_size: int


@dataclasses.dataclass(frozen=True)
class RLConfig:
  num_generations: int
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  epochs: int
  num_minibatches: int
  scale_rewards: str
  kl_placement: str
  kl_estimator: str
  loss_type: str
  cliprange: float
  cliprange_high: float | None
  gamma: float
  lam: float
  cliprange_value: float
  vf_coef: float
  whiten_advantages: bool
  missing_eos_penalty: float
  mask_truncated_completions: bool
  reward_fn: str
  reward_model: str | None
  reward_weights: str
  eval_prompts: str | None
  eval_samples: int


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  kind: str
  learning_rate: float
  end_learning_rate: float
  schedule: str
  warmup_steps: int
  decay_steps: int | None
  decay_fraction: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  decay_embeddings: bool
  decay_norms_and_biases: bool
  grad_clip: float
  muon_learning_rate: float
  muon_weight_decay: float
  muon_momentum: float


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int
  init_from: str | None
  batch_size: int
  grad_accum_steps: int
  log_every_steps: int
  nan_policy: str
  xla_gpu_flags: bool
  max_skipped_fraction: float
  dead_grad_steps: int
  max_param_growth: float


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every_steps: int
  num_batches: int
  batch_size: int


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int
  keep: int
  keep_best: bool
  async_save: bool
  allow_config_change: bool
  allow_data_change: bool
  start_over: bool


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int
  fsdp: int
  tensor: int


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  auto_detect: bool
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int
  data: DataConfig
  model: ModelSection
  objective: ObjectiveConfig
  rl: RLConfig
  optimizer: OptimizerConfig
  train: TrainConfig
  eval: EvalConfig
  checkpoint: CheckpointConfig
  mesh: MeshConfig
  distributed: DistributedConfig


def typed(config: ml_collections.ConfigDict) -> Config:
  """The frozen, typed view of a validated config (call `validation.validate` first)."""
  return section(Config, config, "")


def section(cls, node, prefix: str):
  """One section as `cls` (e.g. `DataConfig` from `config.data`, prefix "data."); typed input passes through."""
  if isinstance(node, cls):
    return node
  return _build(cls, node, prefix)


# ---- the schema's history: what changed in configs/default.py since runs were checkpointed -----
# A checkpoint's config is read through `with_added_keys`; resume compares through it too
# (`run/checkpoint.py`), and the objective's keys it does not read are neutral (`objectives.neutralised`).

REMOVED_KEYS = ("data.shuffle_buffer",)  # declared once, read nowhere: ignored in older runs' configs
# Keys added after runs were checkpointed without them, with the value those runs behaved as.
ADDED_KEYS = {"train.max_skipped_fraction": 0.1, "train.dead_grad_steps": 3, "train.max_param_growth": 100.0,
              "train.init_from": None, "objective.kind": "next_token", "objective.beta": 0.1,
              "objective.label_smoothing": 0.0, "objective.simpo_gamma": 0.0, "objective.reference": "live",
              "objective.rpo_alpha": 0.0, "objective.center_rewards_coefficient": 0.0,
              "model.qk_norm": False, "model.head_dim": None, "model.norm_eps": None,
              "model.attention_bias": "none", "model.mlp_bias": False, "optimizer.kind": "adamw", "optimizer.decay_fraction": 0.2,
              "optimizer.muon_learning_rate": 0.02, "optimizer.muon_weight_decay": 0.0, "optimizer.muon_momentum": 0.95,
              # the rl section (reward maximisation): runs before it had no RL objective, so its defaults
              "rl.num_generations": 4, "rl.max_new_tokens": 32, "rl.temperature": 1.0, "rl.top_k": 0,
              "rl.top_p": 1.0, "rl.epochs": 1, "rl.num_minibatches": 1, "rl.scale_rewards": "group",
              "rl.kl_placement": "reward", "rl.kl_estimator": "k1", "rl.loss_type": "dapo", "rl.cliprange": 0.2,
              "rl.cliprange_high": None, "rl.gamma": 1.0, "rl.lam": 0.95, "rl.cliprange_value": 0.2,
              "rl.vf_coef": 0.1, "rl.whiten_advantages": False, "rl.missing_eos_penalty": 0.0, "rl.mask_truncated_completions": False,
              "rl.reward_fn": "", "rl.reward_model": None, "rl.reward_weights": "", "rl.eval_prompts": None, "rl.eval_samples": 4}
ADDED_SOURCE_KEYS = {"max_prompt_length": None, "max_response_length": None, "exclude_modules": ""}  # in every data.sources.<name>


def with_added_keys(saved: dict) -> dict:
  """A copy of a checkpoint's config (a config.json dict) with the keys added since it was written, at
  the values it ran with (`ADDED_KEYS`, `ADDED_SOURCE_KEYS`)."""
  out = json.loads(json.dumps(saved))
  for key, default in ADDED_KEYS.items():
    *parents, leaf = key.split(".")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node.setdefault(leaf, default)
  for source in out.get("data", {}).get("sources", {}).values():
    for key, default in ADDED_SOURCE_KEYS.items():
      source.setdefault(key, default)
  return out


def _build(cls, node, prefix: str):
  hints = typing.get_type_hints(cls)
  declared = {f.name for f in dataclasses.fields(cls)}
  given = set(node.keys()) - {k[len(prefix):] for k in REMOVED_KEYS if k.startswith(prefix)}
  if given - declared:
    key = prefix + sorted(given - declared)[0]
    raise ConfigError(key, node[key[len(prefix):]], "is not a declared key (see configs/default.py)")
  if declared - given:
    key = prefix + sorted(declared - given)[0]
    raise ConfigError(key, None, "is missing (every key of configs/default.py must be present)")
  values = {}
  for name in declared:
    hint, value = hints[name], node[name]
    if dataclasses.is_dataclass(hint):
      value = _build(hint, value, f"{prefix}{name}.")
    elif typing.get_origin(hint) is collections.abc.Mapping:
      item = typing.get_args(hint)[1]
      value = types.MappingProxyType(
          {k: _build(item, v, f"{prefix}{name}.{k}.") for k, v in value.items()})
    values[name] = value
  return cls(**values)

