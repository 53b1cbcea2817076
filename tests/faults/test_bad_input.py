"""Bad input stops with exactly one `error:` line naming the culprit, before anything is written (issue #12).

The command lines run in-process (`train.main` / `evaluate.main` past flag parsing, so a case costs
no interpreter start and no compile); only a --config file that does not load needs a real
command line, since the config flag parses sys.argv while it is defined. `sys.exit("error: ...")`
exits with status 1 after printing its message, so a SystemExit whose code is that string, with
nothing else on stderr, is what the command line shows.
"""

import os
import subprocess
import sys
import types

import ml_collections
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
sys.path[:0] = [TESTS, ROOT, os.path.dirname(os.path.abspath(__file__))]  # _faults.py

from _faults import one_error_line, train_main  # noqa: E402
from _tiny import tiny_config  # noqa: E402
from configs import default  # noqa: E402
from lmobjective.analysis import evaluate  # noqa: E402
from lmobjective.run import experiment, launch  # noqa: E402


def _assert_nothing_written(change, while_building: bool = False) -> None:
  """`change`: the workdir's (before, after) listings; errors found while building the data write
  nothing either (run() builds before it writes, and the lock removes a workdir it created)."""
  before, after = change
  assert after == before


def _tiny(tmp_path, **overrides):
  return tiny_config(tmp_path / "cache", **overrides)


def _one_source(tmp_path, kind, path, tokenizer="byte", **fields):
  """The tiny config reading one source `f` of `kind` from `path` (no stdlib corpus to load)."""
  c = _tiny(tmp_path, **{"data.tokenizer.kind": tokenizer})
  c.data.sources = ml_collections.ConfigDict({"f": default.source(kind, 1.0, path=str(path), **fields)})
  return c


def _write(path, data: bytes):
  path.write_bytes(data)
  return path


BINARY = bytes(range(256)) * 40  # NUL at offset 0
NOT_UTF8 = bytes(range(128, 256)) * 40  # no NUL, every byte invalid UTF-8


# ---- 1. the --config file ---------------------------------------------------------------------


@pytest.mark.parametrize("module,body,says", [
    ("lmobjective.train", None, "no such file"),
    ("lmobjective.train", "def get_config(:\n", "syntax error at line 1"),
    ("lmobjective.run.train_tokenizer", None, "no such file"),
])
def test_config_file_that_does_not_load_names_it(tmp_path, module, body, says):
  path = tmp_path / "conf.py"
  if body is not None:
    path.write_text(body)
  workdir = tmp_path / "run"
  out_flag = "--workdir" if module == "lmobjective.train" else "--output"
  r = subprocess.run([sys.executable, "-m", module, f"--config={path}", f"{out_flag}={workdir}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert r.returncode == 1 and len(lines) == 1, r.stderr
  assert lines[0] == f"error: --config={path}: {says}" + (": invalid syntax" if body else "")
  assert not workdir.exists()


@pytest.mark.parametrize("body,says", [
    ("def get_config(arg=None):\n  raise RuntimeError('boom')\n", "loading it raised RuntimeError: boom"),
    ("x = 1\n", "defines no get_config()"),
    ("def get_config(arg=None):\n  return None\n", "get_config() returned NoneType, not a ConfigDict"),
    (None, "is a directory, not a config file"),
])
def test_config_file_whose_code_fails_names_it(tmp_path, capsys, body, says):
  path = tmp_path / "conf.py"
  path.mkdir() if body is None else path.write_text(body)
  with pytest.raises(SystemExit) as e:
    launch.check_config_file(["train", f"--config={path}:arg" if body else f"--config={path}"], "unused")
  assert one_error_line(e.value.code, capsys).startswith(f"error: --config={path}") and says in e.value.code


# ---- 2. --workdir -----------------------------------------------------------------------------


def test_workdir_that_is_a_file_or_under_one(tmp_path, capsys):
  a_file = _write(tmp_path / "notes.txt", b"keep me")
  line, change = train_main(_tiny(tmp_path), a_file, capsys)
  assert line == f"error: config.workdir='{a_file}': exists and is not a directory"
  _assert_nothing_written(change)
  line, change = train_main(_tiny(tmp_path), a_file / "run", capsys)
  assert line == f"error: config.workdir='{a_file / 'run'}': {a_file} is not a directory"
  _assert_nothing_written(change)
  assert a_file.read_bytes() == b"keep me"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_workdir_where_nothing_can_be_created(tmp_path, capsys):
  # permission bits do not stop root; /proc refuses everyone
  line, change = train_main(_tiny(tmp_path), "/proc/lmobjective-run", capsys)
  assert line.startswith("error: config.workdir='/proc/lmobjective-run': cannot create anything in /proc (")
  _assert_nothing_written(change)


# ---- 3. Parquet sources -------------------------------------------------------------------------


def test_parquet_source_that_is_not_parquet(tmp_path, capsys):
  fake = _write(tmp_path / "docs.parquet", b"just some text\nrenamed to .parquet\n")
  line, change = train_main(_one_source(tmp_path, "parquet", fake), tmp_path / "run", capsys)
  assert line.startswith(f"error: config.data.sources.f.path='{fake}': is not a Parquet file (")
  _assert_nothing_written(change, while_building=True)


def test_parquet_text_column_of_numbers(tmp_path, capsys):
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = tmp_path / "docs.parquet"
  pq.write_table(pa.table({"text": pa.array(np.arange(50), pa.int64())}), path)
  line, change = train_main(_one_source(tmp_path, "parquet", path), tmp_path / "run", capsys)
  assert line == (f"error: config.data.sources.f.text_field='text': {path}: the column holds int64, "
                  "not text (string or binary)")
  _assert_nothing_written(change, while_building=True)


# ---- 4. the mesh against the model ----------------------------------------------------------------


@pytest.mark.parametrize("overrides,says", [
    ({"mesh.tensor": 4}, "config.mesh.tensor=4: must divide model.num_heads=2"),  # tiny has 2 heads
    ({"model.num_heads": 4, "model.num_kv_heads": 2, "mesh.tensor": 4}, "must divide model.num_kv_heads=2"),
    ({"mesh.tensor": 2, "model.mlp_dim": 101}, "config.mesh.tensor=2: must divide model.mlp_dim=101"),
    ({"mesh.tensor": 2, "model.vocab_size": 513}, "config.mesh.tensor=2: must divide model.vocab_size=513"),
    ({"mesh.fsdp": 8, "model.embed_dim": 68}, "config.mesh.fsdp=8: must divide model.embed_dim=68"),
])
def test_mesh_axis_that_does_not_divide_the_model(tmp_path, capsys, overrides, says):
  line, change = train_main(_tiny(tmp_path, **overrides), tmp_path / "run", capsys)
  assert says in line, line
  _assert_nothing_written(change)


def test_tokenizer_vocabulary_the_tensor_axis_cannot_split():
  """Found only once the tokenizer is known (and before it is saved): the 8-device case, by hand."""
  mesh = types.SimpleNamespace(shape={"tensor": 2})
  tok = types.SimpleNamespace(vocab_size=369)
  model = types.SimpleNamespace(vocab_size=None)
  with pytest.raises(ValueError, match=r"model.vocab_size=None: the tokenizer's vocabulary 369 is not a "
                                       r"multiple of mesh.tensor=2: set model.vocab_size to one \(e.g. 370\)"):
    experiment._check_vocab_fits(model, mesh, tok)
  experiment._check_vocab_fits(types.SimpleNamespace(vocab_size=370), mesh, tok)


# ---- 4b. optimizer and recipe switches -------------------------------------------------------------


@pytest.mark.parametrize("overrides,says", [
    ({"optimizer.kind": "sgd"}, "error: config.optimizer.kind='sgd': must be one of adamw, muon"),
    ({"optimizer.schedule": "step"}, "error: config.optimizer.schedule='step': must be one of cosine, linear, "
                                     "constant, wsd"),
    ({"model.mlp": "relu"}, "error: config.model.mlp='relu': must be one of swiglu, gelu, relu2"),
    ({"optimizer.decay_fraction": 1.5}, "error: config.optimizer.decay_fraction=1.5: must be <= 1.0"),
    ({"optimizer.schedule": "wsd", "optimizer.decay_fraction": 0.95},  # tiny: 20 steps, 2 of warmup
     "error: config.optimizer.decay_fraction=0.95: its 19 decay steps and optimizer.warmup_steps=2 exceed the "
     "20 steps of warmup+decay"),
    ({"optimizer.muon_momentum": 1.0}, "error: config.optimizer.muon_momentum=1.0: must be in [0, 1)"),
    ({"objective.rpo_alpha": 0.5}, "error: config.objective.rpo_alpha=0.5: objective.kind='next_token' does not read "
                                   "it (leave it at 0.0); it applies to objective.kind dpo, ipo or simpo"),
    ({"objective.rpo_alpha": -1.0}, "error: config.objective.rpo_alpha=-1.0: objective.kind='next_token' does not "
                                    "read it (leave it at 0.0); it applies to objective.kind dpo, ipo or simpo"),
])
def test_unknown_optimizer_schedule_or_mlp(tmp_path, capsys, overrides, says):
  line, change = train_main(_tiny(tmp_path, **overrides), tmp_path / "run", capsys)
  assert line == says
  _assert_nothing_written(change)


# ---- 5. evaluate --text_file --------------------------------------------------------------------


@pytest.mark.parametrize("name,data,says", [
    ("missing.txt", None, "no such file or directory"),
    ("binary.bin", BINARY, "is not text (NUL bytes at offset 0)"),
    ("empty.txt", b"", "is empty (nothing to score)"),
    ("latin1.txt", "café au lait".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 3)"),
])
def test_evaluate_text_file(tmp_path, capsys, name, data, says):
  path = tmp_path / name
  if data is not None:
    _write(path, data)
  workdir = tmp_path / "run"  # the file is read before the run is restored: no run needed
  with flagsaver.flagsaver(), pytest.raises(SystemExit) as e:
    flags.FLAGS(["evaluate", f"--workdir={workdir}", f"--text_file={path}"])
    evaluate.main(["evaluate"])
  assert one_error_line(e.value.code, capsys) == f"error: --text_file={path}: {says}"
  assert not workdir.exists()


# ---- 6. binary files as text sources --------------------------------------------------------------


@pytest.mark.parametrize("kind,data,says", [
    ("text", BINARY, "is not text (NUL bytes at offset 0)"),
    ("jsonl", BINARY, "is not text (NUL bytes at offset 0)"),
    ("chat_jsonl", BINARY, "is not text (NUL bytes at offset 0)"),
    ("text", NOT_UTF8, "is not UTF-8 text (5120 invalid byte sequences in 5120 bytes, the first at offset 0)"),
])
def test_binary_file_as_a_text_source(tmp_path, capsys, kind, data, says):
  path = _write(tmp_path / "data.bin", data)
  config = _one_source(tmp_path, kind, path, tokenizer="sentencepiece")  # it failed on the vocabulary
  line, change = train_main(config, tmp_path / "run", capsys)
  assert line == f"error: config.data.sources.f.path='{path}': {says}"
  _assert_nothing_written(change, while_building=True)


def test_glob_that_matches_a_binary_names_that_file(tmp_path, capsys):
  (tmp_path / "docs").mkdir()
  _write(tmp_path / "docs" / "a.txt", b"plain text\n" * 50)
  binary = _write(tmp_path / "docs" / "b.dat", BINARY)
  line, change = train_main(_one_source(tmp_path, "text", tmp_path / "docs" / "*"), tmp_path / "run", capsys)
  assert line == f"error: config.data.sources.f.path='{binary}': is not text (NUL bytes at offset 0)"
  _assert_nothing_written(change, while_building=True)


# ---- 7. a failed run leaves no tokenizer that refuses its corrected rerun ------------------------


def _words(n_lines: int, seed: int = 0) -> bytes:
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  words = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(3000)]
  return "\n".join(" ".join(rng.choice(words, size=12)) for _ in range(n_lines)).encode() + b"\n"


def test_failed_vocabulary_check_leaves_no_tokenizer(tmp_path, capsys):
  text = _write(tmp_path / "words.txt", _words(2000))
  workdir = tmp_path / "run"
  config = _one_source(tmp_path, "text", text, tokenizer="sentencepiece")
  config.data.tokenizer.vocab_size, config.model.vocab_size = 1024, 600
  line, change = train_main(config, workdir, capsys)
  assert line == "error: config.model.vocab_size=600: must be >= the tokenizer's vocabulary 1024"
  assert not (workdir / "tokenizer").exists()
  config.data.tokenizer.vocab_size = 512  # the correction: a smaller tokenizer, in the same workdir
  exp = experiment.build(config, str(workdir))  # what the rerun builds (it refused: "use a new workdir")
  assert exp.tokenizer.vocab_size == 512 and (workdir / "tokenizer").is_dir()
  _assert_nothing_written(change, while_building=True)


def test_failed_tokenizer_training_leaves_no_tokenizer(tmp_path, capsys):
  text = _write(tmp_path / "words.txt", _words(200))
  config = _one_source(tmp_path, "text", text, tokenizer="sentencepiece")
  config.data.tokenizer.vocab_size = 1 << 20
  line, change = train_main(config, tmp_path / "run", capsys)
  assert line.startswith("error: config.data.tokenizer.vocab_size=1048576: sentencepiece training failed: ")
  assert not (tmp_path / "run" / "tokenizer").exists()
  _assert_nothing_written(change, while_building=True)


# ---- 8. more of the same class ---------------------------------------------------------------------


def test_jsonl_text_field_that_is_a_list(tmp_path, capsys):
  path = _write(tmp_path / "docs.jsonl", b'{"text": ["a", "b"]}\n{"text": "ok"}\n')
  line, change = train_main(_one_source(tmp_path, "jsonl", path), tmp_path / "run", capsys)
  assert line == f"error: config.data.sources.f.text_field='text': {path}:1: the field holds a JSON list, not a string"
  _assert_nothing_written(change, while_building=True)


def test_array_record_source_that_is_not_array_record(tmp_path, capsys):
  path = _write(tmp_path / "docs.array_record", b"plain text\n" * 50)
  line, change = train_main(_one_source(tmp_path, "array_record", path), tmp_path / "run", capsys)
  assert line.startswith(f"error: config.data.sources.f.path='{path}': is not an ArrayRecord file (")
  _assert_nothing_written(change, while_building=True)


def test_tokenizer_path_that_is_not_a_tokenizer(tmp_path, capsys):
  path = _write(tmp_path / "spm.model", b"plain text\n")
  config = _tiny(tmp_path, **{"data.tokenizer.path": str(path)})
  line, change = train_main(config, tmp_path / "run", capsys)
  assert line == f"error: config.data.tokenizer.path='{path}': is not a SentencePiece model"
  _assert_nothing_written(change, while_building=True)


def test_cache_dir_that_is_a_file(tmp_path, capsys):
  a_file = _write(tmp_path / "cache", b"")
  config = _one_source(tmp_path, "text", _write(tmp_path / "a.txt", b"plain text\n" * 50))
  config.data.cache_dir = str(a_file)
  line, change = train_main(config, tmp_path / "run", capsys)
  assert line == f"error: config.data.cache_dir='{a_file}': exists and is not a directory"
  _assert_nothing_written(change, while_building=True)
