"""Faults of a stage (`train.init_from`) and of its data: one `error:` line each, before anything is written.

One tiny origin (a char tokenizer, one layer, checkpoints at steps 1 and 2) is shared by the module;
a test that changes it works on a copy. Stages run in-process (`train_main`: the command line past
flag parsing), so a refusal costs no interpreter start.
"""

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _faults.py

from _faults import ROOT, entries, train_main, write_text  # noqa: E402
from _stages import stage_config  # noqa: E402
from lmobjective import files  # noqa: E402
from lmobjective.data import tokenizers  # noqa: E402
from lmobjective.run import lock, train  # noqa: E402

COMMON = {"data.tokenizer.kind": "char", "data.context_length": 24, "model.num_layers": 1, "model.embed_dim": 32,
          "eval.num_batches": 0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """(directory, the origin's workdir, its text file)."""
  d = tmp_path_factory.mktemp("stage_faults")
  text = write_text(d / "corpus.txt")
  cfg = stage_config(d / "cache", "text", text, **COMMON, **{"train.steps": 2, "checkpoint.every_steps": 1,
                                                              "checkpoint.keep": 5})
  with contextlib.redirect_stdout(io.StringIO()):
    train.run(cfg, str(d / "origin"))
  return d, d / "origin", text


def sft_stage(world, origin=None, **overrides):
  """A next-token stage on the origin's text, from `origin` (default: the shared one)."""
  d, shared, text = world
  return stage_config(d / "cache", "text", text, **COMMON, **{
      "train.init_from": str(origin or shared), "train.steps": 2, "checkpoint.every_steps": 2, **overrides})


# ---- 1. an origin still being trained ------------------------------------------------------------

HOLD = "import sys\nfrom lmobjective.run.lock import WorkdirLock\nwith WorkdirLock(sys.argv[1]):\n" \
       "  print('held', flush=True)\n  sys.stdin.read()\n"


@contextlib.contextmanager
def held_by_another_process(workdir):
  """`workdir`'s lock, held by a live process (this one's own lock would not count: holder() skips it)."""
  p = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       env=dict(os.environ, PYTHONPATH=ROOT), text=True)
  try:
    assert p.stdout.readline() == "held\n"
    yield p.pid
  finally:
    p.communicate("", timeout=30)  # released: its lock file is removed


def test_a_live_origin_is_refused_naming_its_holder(world, tmp_path, capsys):
  _, origin, _ = world
  before = entries(origin)
  with held_by_another_process(origin) as pid:
    record = files.read_json(str(origin / lock.LOCK_FILE))
    line, change = train_main(sft_stage(world), tmp_path / "stage", capsys)
  assert record["pid"] == pid and record["host"] == socket.gethostname()
  assert line == (f"error: config.train.init_from='{origin}': {origin} is still being trained by pid {pid} on "
                  f"{record['host']} since {lock.describe(record).split(' since ')[1]} ({origin / lock.LOCK_FILE}): "
                  "its checkpoint rotation may delete the step this stage starts from; wait for that run to finish")
  assert change == (False, False)  # the stage's workdir was never left behind
  assert entries(origin) == before


# ---- 2. an origin whose tokenizer was replaced ---------------------------------------------------


def copy_of_origin(world, tmp_path, name="origin"):
  _, origin, _ = world
  return shutil.copytree(origin, tmp_path / name)


def test_an_origin_whose_tokenizer_was_replaced_names_the_tokenizer(world, tmp_path, capsys):
  origin = copy_of_origin(world, tmp_path)
  trained_with = tokenizers.load(str(origin / "tokenizer"))[0].fingerprint()
  shutil.rmtree(origin / "tokenizer")
  other = tokenizers.CharTokenizer("abcdef\n")  # another vocabulary: the embedding's shape differs
  tokenizers.save(other, str(origin / "tokenizer"), {"kind": "char"})
  line, change = train_main(sft_stage(world, origin), tmp_path / "stage", capsys)
  assert line == (f"error: config.train.init_from='{origin}': {origin / 'tokenizer'} is not the tokenizer its "
                  f"checkpoints were trained with (fingerprint {other.fingerprint()}; the checkpoint at step 2 "
                  f"records {trained_with}): put that tokenizer back in {origin / 'tokenizer'}")
  assert change == (False, False)
