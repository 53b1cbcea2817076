"""The tiny preset (derived from the default config) with dotted-key overrides, shared by tests."""

import os

from lmobjective.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_key(cfg, key: str, value) -> None:
  node = cfg
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def tiny_config(cache_dir, **overrides):
  """configs/tiny.py with `data.cache_dir=cache_dir` and `{"a.b": value}` overrides applied in order."""
  c = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
  c.data.cache_dir = str(cache_dir)
  for key, value in overrides.items():
    set_key(c, key, value)
  return c


def model_config(**fields):
  """configs/default.py's model section, resolved, with `fields` replaced: tests build small models
  from the real defaults (ModelConfig has none of its own)."""
  import dataclasses

  from lmobjective.model import ModelConfig

  base = ModelConfig.from_config(load_config_file(os.path.join(ROOT, "configs", "default.py")).model,
                                 vocab_size=fields.get("vocab_size", 512), context_length=fields.get("max_len", 128))
  return dataclasses.replace(base, **fields)
