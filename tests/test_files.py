"""files.py: a write either lands whole or leaves the old file and no temporary behind."""

import json
import os

import pytest

from lmobjective import files


def test_atomic_write_replaces_whole_and_leaves_nothing_else(tmp_path):
  path = tmp_path / "out.json"
  files.write_json(str(path), {"a": 1}, indent=1)
  files.write_json(str(path), {"a": 2}, indent=1)
  assert json.loads(path.read_text()) == {"a": 2} and os.listdir(tmp_path) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  files.atomic_write(str(path), "old\n")

  def disk_full(fd):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(os, "fsync", disk_full)
  with pytest.raises(OSError, match="No space"):
    files.atomic_write(str(path), "new, half written\n")
  assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_atomic_path_keeps_the_extension_and_a_directory_written_first(tmp_path):
  with files.atomic_path(str(tmp_path / "plot.png")) as tmp:
    assert tmp.endswith(".png") and os.path.dirname(tmp) == str(tmp_path)
    open(tmp, "w").write("png")
  target = tmp_path / "tokenizer"
  with files.atomic_path(str(target), directory=True) as tmp:
    open(os.path.join(tmp, "a"), "w").write("first")
  with files.atomic_path(str(target), directory=True) as tmp:  # another process was faster: keep theirs
    open(os.path.join(tmp, "a"), "w").write("second")
  assert (target / "a").read_text() == "first"
  assert sorted(os.listdir(tmp_path)) == ["plot.png", "tokenizer"]


def test_read_json_defaults_only_for_missing_or_partial_files(tmp_path):
  assert files.read_json(str(tmp_path / "absent.json"), default={}) == {}
  (tmp_path / "half.json").write_text('{"step": 4, "lo')
  assert files.read_json(str(tmp_path / "half.json")) is None
  (tmp_path / "ok.json").write_text('{"step": 4}')
  assert files.read_json(str(tmp_path / "ok.json")) == {"step": 4}
  with pytest.raises(IsADirectoryError):
    files.read_json(str(tmp_path))


def test_finished_files_and_directories_get_the_ordinary_mode(tmp_path):
  """Not tempfile's private 0600/0700: config.json, plots and tokenizers stay readable by others."""
  umask = os.umask(0)
  os.umask(umask)
  files.write_json(str(tmp_path / "config.json"), {})
  with files.atomic_path(str(tmp_path / "tokenizer"), directory=True):
    pass
  assert os.stat(tmp_path / "config.json").st_mode & 0o777 == 0o666 & ~umask
  assert os.stat(tmp_path / "tokenizer").st_mode & 0o777 == 0o777 & ~umask
