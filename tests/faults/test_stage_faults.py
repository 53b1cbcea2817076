"""Faults of a stage (`train.init_from`) and of its data: one `error:` line each, before anything is written.

1. an origin still being trained (its lock held), 2. an origin whose tokenizer/ was replaced, 3. an
origin moved after the stage started (and the way out), 4. a full disk as the reference cache is
written, 5. a chat source whose answers are all empty, 6. preference pairs tied after truncation.

One tiny origin (a char tokenizer, one layer, checkpoints at steps 1 and 2) is shared by the module;
a test that changes it works on a copy. Stages run in-process (`train_main`: the command line past
flag parsing), so a refusal costs no interpreter start.
"""

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _faults.py

from _faults import ROOT, entries, temporaries, train_main, write_text  # noqa: E402
from _stages import stage_config  # noqa: E402
from lmobjective import data, faults, files  # noqa: E402
from lmobjective.data import DataWarning, tokenizers  # noqa: E402
from lmobjective.run import checkpoint as ckpt_lib  # noqa: E402
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


def text_stage(world, origin=None, **overrides):
  """A next-token stage on the origin's text, from `origin` (default: the shared one)."""
  d, shared, text = world
  return stage_config(d / "cache", "text", text, **{
      **COMMON, "train.init_from": str(origin or shared), "train.steps": 2, "checkpoint.every_steps": 2, **overrides})


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
    line, change = train_main(text_stage(world), tmp_path / "stage", capsys)
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
  line, change = train_main(text_stage(world, origin), tmp_path / "stage", capsys)
  assert line == (f"error: config.train.init_from='{origin}': {origin / 'tokenizer'} is not the tokenizer its "
                  f"checkpoints were trained with (fingerprint {other.fingerprint()}; the checkpoint at step 2 "
                  f"records {trained_with}): put that tokenizer back in {origin / 'tokenizer'}")
  assert change == (False, False)


# ---- 3. an origin moved after the stage started ---------------------------------------------------


def test_a_moved_origin_says_the_way_out_and_resumes_from_its_new_path(world, tmp_path, capsys):
  old, w = copy_of_origin(world, tmp_path), tmp_path / "stage"
  with contextlib.redirect_stdout(io.StringIO()):
    train.run(text_stage(world, old), str(w))
  started = json.load(open(w / "config.json"))["origin"]
  assert started["workdir"] == str(old) and started["step"] == 2
  new = old.rename(tmp_path / "moved")
  before = entries(w)
  line, change = train_main(text_stage(world, old), w, capsys)  # the same command
  assert line == (f"error: config.train.init_from='{old}': this run started from {old} step 2, and {old} is gone: "
                  "if it moved, move it back there, or rerun with --config.train.init_from=<its new path> "
                  "--config.checkpoint.allow_config_change=True (its step 2 and params are checked there); else use "
                  "a new workdir")
  assert change == (before, before)
  line, change = train_main(text_stage(world, new), w, capsys)  # the new path alone
  assert line == (f"error: config.checkpoint='step 2': the config differs from the checkpoint's: train.init_from: "
                  f"'{old}' -> '{new}'; if the origin moved, move it back, or rerun with "
                  "--config.checkpoint.allow_config_change=True (the stage's recorded step and params are then checked "
                  "at the new path); else use a new workdir")
  assert change == (before, before)
  more = {"train.steps": 4, "checkpoint.allow_config_change": True}
  line, change = train_main(text_stage(world, f"{new}:1", **more), w, capsys)  # another step is another reference
  assert line == (f"error: config.train.init_from='{new}:1': this run started from step 2 of its origin; a resumed "
                  "stage keeps its reference: name step 2, or use a new workdir")
  assert change == (before, before)
  with contextlib.redirect_stdout(io.StringIO()) as out:
    train.run(text_stage(world, new, **more), str(w))  # the way out: found there, same params
  assert "resuming from the checkpoint at step 2" in out.getvalue()
  assert f"init_from: {new} step 2 (params sha256 {started['params_fingerprint']})" in out.getvalue()
  assert json.load(open(w / "config.json"))["origin"] == {**started, "workdir": str(new)}
  assert ckpt_lib.finalized_steps(str(w)) == [2, 4]


# ---- 4. a full disk as the reference cache is written ---------------------------------------------


def write_pairs(path, n=24, tie=None):
  """`n` pairs 'reverse w' -> w reversed (chosen) or w (rejected); `tie(i)`: the i-th pair's rejected is
  its chosen ('same') or its chosen with another last word ('last word'), None: not tied."""
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    for i in range(n):
      w = "".join(rng.choice(list("abcdefgh"), rng.integers(3, 9)))
      chosen, rejected = f"{w[::-1]} is the answer", w
      how = tie(i) if tie else None
      if how == "same":
        rejected = chosen
      elif how == "last word":
        chosen, rejected = f"{w[::-1]} {'x' * 20} yes", f"{w[::-1]} {'x' * 20} no"
      f.write(json.dumps({"prompt": f"reverse {w}", "chosen": chosen, "rejected": rejected}) + "\n")
  return path


def dpo_stage(world, pairs, **overrides):
  d, origin, _ = world
  return stage_config(d / "cache", "preference_jsonl", pairs, {"val_fraction": 0.1}, **{
      **COMMON, "objective.kind": "dpo", "train.init_from": str(origin), "train.steps": 2, "train.batch_size": 4,
      "eval.batch_size": 4, "checkpoint.every_steps": 2, **overrides})


def test_a_full_disk_as_the_reference_cache_is_written_is_one_line(world, tmp_path, capsys, monkeypatch):
  cache = tmp_path / "cache"  # the tokenized pairs land; the reference's table does not
  monkeypatch.setenv(faults.ENV, "reference.save=enospc")
  line, change = train_main(dpo_stage(world, write_pairs(tmp_path / "pairs.jsonl"), **{"data.cache_dir": str(cache)}),
                            tmp_path / "stage", capsys)
  (tokens,) = os.listdir(cache)
  assert tokens.startswith("preference-") and "-reference-" not in tokens and not temporaries(cache)
  assert re.fullmatch(rf"error: cannot write {re.escape(str(cache))}/preference-reference-\w+\.npz \(No space left "
                      r"on device\): the reference log-probs' cache \(data\.cache_dir\); nothing else was written: "
                      r"free space and rerun the same command", line), line
  assert change == (False, False)


# ---- 5. a chat source whose answers are all empty ---------------------------------------------------


def write_chats(path, empty, n=40):
  """`n` conversations of a question and an answer, the i-th answer empty where `empty(i)`."""
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                       {"role": "assistant", "content": "" if empty(i) else f"{2 * i}"}]}) + "\n")
  return path


def chat_run(tmp_path, chats):
  return stage_config(tmp_path / "cache", "chat_jsonl", chats, {"val_fraction": 0.1}, **{"data.tokenizer.kind": "byte"})


def test_a_chat_source_whose_answers_are_all_empty_is_refused(tmp_path, capsys):
  chats = write_chats(tmp_path / "chats.jsonl", empty=lambda i: True)
  line, change = train_main(chat_run(tmp_path, chats), tmp_path / "run", capsys)
  assert line == (f"error: config.data.sources.chat.path='{chats}': every assistant turn is empty (36 in the train "
                  "split of source 'chat'): it would train the model to answer with <|end|> at once")
  assert change == (False, False) and not (tmp_path / "cache").exists()  # not even its tokens were cached


def test_a_chat_source_with_some_empty_answers_still_trains(tmp_path):
  chats = write_chats(tmp_path / "chats.jsonl", empty=lambda i: i % 2 == 0)
  cfg = chat_run(tmp_path, chats)
  pipe = data.build_pipeline(cfg.data, tokenizers.ByteTokenizer(), seed=0, batch_size=2, cache_dir=str(tmp_path / "c"))
  assert pipe.train_rows[0].scored_targets() > 0


# ---- 6. preference pairs whose two rows are identical after truncation -------------------------------


def test_pairs_all_tied_after_truncation_are_refused_before_anything_is_written(world, tmp_path, capsys):
  same = write_pairs(tmp_path / "same.jsonl", tie=lambda i: "same")
  line, change = train_main(dpo_stage(world, same), tmp_path / "stage", capsys)
  assert line == (f"error: config.data.sources.preference.path='{same}': all 22 pairs of the train split have "
                  "identical chosen and rejected rows after truncation to data.context_length=24 (responses written "
                  "identical, or differing only past the cut): there is no preference to learn")
  assert change == (False, False)
  cut = write_pairs(tmp_path / "cut.jsonl", tie=lambda i: "last word")  # 'yes' / 'no' past the 24 tokens
  shorter = {"data.sources.preference.max_prompt_length": 8}
  line, _ = train_main(dpo_stage(world, cut, **shorter), tmp_path / "s2", capsys)
  assert line == (f"error: config.data.sources.preference.path='{cut}': all 22 pairs of the train split have "
                  "identical chosen and rejected rows after truncation to data.context_length=24, "
                  "data.sources.preference.max_prompt_length=8 (responses written identical, or differing only past "
                  "the cut): there is no preference to learn")
  assert tie_warnings(world, cut, **{"data.context_length": 64}) == []  # a context that reaches the last word


def tie_warnings(world, pairs, **overrides) -> list[str]:
  """The tie warnings of a pipeline built on `pairs` (every pair in the train split)."""
  tok = tokenizers.load(str(world[1] / "tokenizer"))[0]
  cfg = dpo_stage(world, pairs, **{"data.sources.preference.val_fraction": 0.0, **overrides})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", DataWarning)
    data.build_pipeline(cfg.data, tok, seed=0, batch_size=2)
  return [str(w.message) for w in caught if issubclass(w.category, DataWarning) and "identical" in str(w.message)]


def test_some_tied_pairs_are_counted_in_one_warning(world, tmp_path):
  some = write_pairs(tmp_path / "some.jsonl", tie=lambda i: ("same", "last word", None)[i % 3])
  assert tie_warnings(world, some) == [
      "data.sources.preference: 16 of 24 train pairs have identical chosen and rejected rows after truncation to "
      "data.context_length=24 (responses written identical, or differing only past the cut): they carry no preference"]
