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
