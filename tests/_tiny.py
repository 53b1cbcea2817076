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
  cfg = dataclasses.replace(base, **fields)
  derived = {"head_dim": cfg.embed_dim // cfg.num_heads, "norm_eps": 1e-6 if cfg.norm == "rmsnorm" else 1e-5}
  return dataclasses.replace(cfg, **{k: v for k, v in derived.items() if k not in fields})


def run_on_8_devices(script: str, *args, timeout: int = 900) -> dict:
  """`python script args...` with 8 simulated CPU devices; its last stdout line, parsed as JSON.

  The pytest process already started JAX with one device, so 8-device work runs in a subprocess.
  """
  import json
  import subprocess
  import sys

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, script, *map(str, args)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
