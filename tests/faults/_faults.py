"""Shared pieces of the fault-injection suite: one small text run, the CLI, and file listings.

(A module of its own, not a conftest.py: tests/data imports its conftest by that name.)

The run: configs/tiny.py with one `text` source (a file made of stdlib modules, so it is on
every machine) and a byte tokenizer, 8 steps, a checkpoint every 2: each CLI run is a few
seconds, most of them JAX's start-up.
"""

import os
import subprocess
import sys
import sysconfig

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)  # tests/_tiny.py
ROOT = os.path.dirname(TESTS)


STEPS, EVERY = 8, 2
CONFIG_FILE = '''
from lmobjective.config import load_config_file
from configs.default import source


def get_config():
  c = load_config_file({tiny!r})
  c.data.tokenizer.kind = "byte"
  c.data.sources = {{"text": source("text", 1.0, path={text!r})}}
  c.data.cache_dir = {cache!r}
  c.train.steps, c.train.log_every_steps = {steps}, 1
  c.checkpoint.every_steps, c.checkpoint.keep = {every}, 10
  c.eval.every_steps = 4
  return c
'''


def write_text(path, modules=("argparse.py", "dataclasses.py", "inspect.py")):
  stdlib = sysconfig.get_paths()["stdlib"]
  path.write_text("".join(open(os.path.join(stdlib, m), encoding="utf-8").read() for m in modules))
  return path


def make_fault_setup(tmp_path_factory):
  """(config file, text file): the text may be changed by a test that copies it first."""
  d = tmp_path_factory.mktemp("faults")
  text = write_text(d / "corpus.txt")
  cfg = d / "fault_config.py"
  cfg.write_text(CONFIG_FILE.format(tiny=os.path.join(ROOT, "configs", "tiny.py"), text=str(text),
                                    cache=str(d / "cache"), steps=STEPS, every=EVERY))
  return cfg, text


def in_process_config(fault_setup, **overrides):
  """The fault run's config as a ConfigDict (for `train.run` in this process), with overrides."""
  from lmobjective.config import load_config_file
  sys.path.insert(0, ROOT)
  c = load_config_file(str(fault_setup[0]))
  from _tiny import set_key
  for k, v in overrides.items():
    set_key(c, k, v)
  return c


def cli(config_file, workdir, *overrides, faults=None, timeout=300):
  """`python -m lmobjective.train` on the fault config; LMOBJECTIVE_FAULTS=faults if given."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("LMOBJECTIVE_FAULTS", None)
  if faults:
    env["LMOBJECTIVE_FAULTS"] = faults
  cmd = [sys.executable, "-m", "lmobjective.train", f"--config={config_file}", f"--workdir={workdir}",
         *(f"--config.{o}" for o in overrides)]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
  """stderr without the lines every run prints (progress goes to stdout; warnings are kept)."""
  return [line for line in stderr.splitlines() if line.strip()]


def listing(path) -> dict[str, int]:
  """{relative path: size} of every file and directory under `path` (directories: -1); {} if absent."""
  out = {}
  for d, dirs, names in os.walk(path):
    for n in dirs:
      out[os.path.relpath(os.path.join(d, n), path) + "/"] = -1
    for n in names:
      p = os.path.join(d, n)
      out[os.path.relpath(p, path)] = os.path.getsize(p)
  return out


def temporaries(path) -> list[str]:
  """Half-written things: atomic_path's temporaries and orbax's unfinished saves."""
  return sorted(p for p in listing(path) if ".tmp" in os.path.basename(p.rstrip("/")) or "orbax-checkpoint-tmp" in p)


def entries(path) -> object:
  """What is at `path`: False (nothing), True (a file), or every directory's sorted entries."""
  path = str(path)
  if not os.path.isdir(path):
    return os.path.lexists(path)
  return sorted((os.path.relpath(d, path), sorted(ds), sorted(fs)) for d, ds, fs in os.walk(path))


def one_error_line(code, capsys) -> str:
  """The one line a `sys.exit("error: ...")` shows: asserts it is the only line on stderr."""
  assert isinstance(code, str), code  # sys.exit(str): exit status 1, the string on stderr
  err = capsys.readouterr().err + code + "\n"
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err
  assert lines[0].startswith("error: "), lines[0]
  return lines[0]


def train_main(config, workdir, capsys) -> tuple[str, tuple]:
  """`python -m lmobjective.train` on `config` and `workdir`, in-process past flag parsing (no
  interpreter start): its one error line (asserted, with no DataWarning either: each would be one
  more line on the command line's stderr) and the workdir's `entries` (before, after)."""
  import types
  import warnings

  import pytest

  from lmobjective import train as train_cli
  from lmobjective.data import DataWarning
  before = entries(workdir)
  holder = lambda v: types.SimpleNamespace(value=v)
  with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as e:
    warnings.simplefilter("always", DataWarning)
    train_cli.main(["train"], config_flag=holder(config), workdir_flag=holder(str(workdir)))
  assert not [w for w in caught if issubclass(w.category, DataWarning)], [str(w.message) for w in caught]
  return one_error_line(e.value.code, capsys), (before, entries(workdir))
