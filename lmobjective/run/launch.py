"""Flag parsing for the command-line entry points, with one-line errors for bad config overrides.

`ml_collections.config_flags` raises a bare `AttributeError: "'foo'"` with a traceback for an
unknown `--config.train.foo=1`, and it does so while the flag is *defined* (it parses sys.argv
eagerly). So entry points define the flag inside their `cli()` through `define_config_flag`,
which names the unknown key in one line; `parse_flags` does the same for the parsing pass.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from lmobjective.config import DEFAULT_CONFIG, load_config_file

FLAG_PREFIX = "--config."


def _load_config_file(argv: list[str], default: str):
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), default)
  return load_config_file(spec)


def unknown_override_keys(config, argv: list[str]) -> list[str]:
  """Override keys in argv (`--config.a.b=v` or `--config.a.b`) that the config does not declare."""
  unknown = []
  for a in argv:
    if not a.startswith(FLAG_PREFIX):
      continue
    key = a[len(FLAG_PREFIX):].split("=", 1)[0]
    node = config
    for part in key.split("."):
      try:
        node = node[part]
      except (KeyError, TypeError, AttributeError):
        unknown.append(key)
        break
  return unknown


def _exit_bad_override(argv: list[str], default_config: str, err: Exception):
  try:
    unknown = unknown_override_keys(_load_config_file(argv, default_config), argv)
  except Exception:  # the config file itself does not load: report the original problem
    unknown = []
  if unknown:
    sys.exit(f"error: unknown config key: config.{unknown[0]} (not declared in the config file)")
  sys.exit(f"error: bad --config override: {err}")


def define_config_flag(default_config: str = DEFAULT_CONFIG, argv: list[str] | None = None):
  """DEFINE_config_file('config', ...) with one-line errors for unknown keys."""
  try:
    return config_flags.DEFINE_config_file("config", default_config, "Experiment config file.",
                                           lock_config=True)
  except (AttributeError, KeyError) as e:
    _exit_bad_override(sys.argv if argv is None else argv, default_config, e)


def parse_flags(argv: list[str]) -> list[str]:
  """`absl.app.run(main, flags_parser=parse_flags)`: like the default parser, with clear errors."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError) as e:
    _exit_bad_override(argv, DEFAULT_CONFIG, e)
