"""Flag parsing for the command-line entry points, with one-line errors for bad config overrides.

`ml_collections.config_flags` raises a bare `AttributeError: "'foo'"` with a traceback for an
unknown `--config.train.foo=1`, and it does so while the flag is *defined* (it parses sys.argv
eagerly). So entry points define the flag inside their `cli()` through `define_config_flag`,
which names the unknown key in one line; `parse_flags` does the same for the parsing pass.
A `--config` file that is missing or does not load (syntax error, an exception, no `get_config`)
is caught before that, in one line naming the file: config_flags defers a missing file's error
to the first read of the config, and lets any other error through as a traceback.
"""

from __future__ import annotations

import os
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from lmobjective.config import DEFAULT_CONFIG, load_config_file

FLAG_PREFIX = "--config."


def config_spec(argv: list[str], default: str) -> str:
  """The value of `--config=SPEC` (or `--config SPEC`) in argv; the last one wins, as in absl."""
  spec = default
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def _load_config_file(argv: list[str], default: str):
  return load_config_file(config_spec(argv, default))


def config_file_problem(spec: str) -> str | None:
  """Why the config file `path[:arg]` cannot give a config, in a few words; None if it does."""
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    return "is a directory, not a config file" if os.path.isdir(path) else "no such file"
  try:
    config = load_config_file(spec)
  except SyntaxError as e:
    return f"syntax error at line {e.lineno}: {e.msg}"
  except Exception as e:  # whatever the file's own code raised
    if isinstance(e, AttributeError) and "get_config" in str(e):
      return "defines no get_config()"
    lines = str(e).strip().splitlines()
    return f"loading it raised {type(e).__name__}" + (f": {lines[0]}" if lines else "")
  if not isinstance(config, ml_collections.ConfigDict):
    return f"get_config() returned {type(config).__name__}, not a ConfigDict"
  return None


def check_config_file(argv: list[str], default: str) -> None:
  """Exits with one `error:` line naming the --config file if it does not load."""
  spec = config_spec(argv, default)
  problem = config_file_problem(spec)
  if problem is not None:
    sys.exit(f"error: --config={spec}: {problem}")


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
  """DEFINE_config_file('config', ...) with one-line errors for a bad config file or unknown keys."""
  check_config_file(sys.argv if argv is None else argv, default_config)
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
