"""sources.py + stdlib_corpus.py: readers for every kind and leak-free splits."""

import json
import warnings

import numpy as np
import pytest

from conftest import file_config
from lmobjective import data
from lmobjective.data import sources, stdlib_corpus, tokenizers
from lmobjective.data.errors import DataWarning


def _load(kind, path, **kw):
  return sources.load_source("f", file_config(kind, path, **kw).data.sources.f)


def test_single_text_file_splits_at_its_tail_on_a_line_break(tmp_path):
  text = "".join(f"line {i}\n" for i in range(100))
  (tmp_path / "a.txt").write_text(text)
  d = _load("text", tmp_path / "a.txt", val_fraction=0.1)
  assert d.train[0] + d.val[0] == text
  assert d.val[0].startswith("line 9") and d.train[0].endswith("\n")
  assert abs(len(d.val[0]) / len(text) - 0.1) < 0.02


def test_many_documents_split_by_seeded_documents_without_overlap(tmp_path):
  for i in range(40):
    (tmp_path / f"{i:02d}.txt").write_text(f"document {i}\n")
  d = _load("text", tmp_path / "*.txt", val_fraction=0.1)
  again = _load("text", str(tmp_path), val_fraction=0.1)  # a directory reads the same files
  assert len(d.train) == 36 and len(d.val) == 4 and d.val == again.val
  assert not set(d.train) & set(d.val) and sorted(d.train + d.val) == sorted(f"document {i}\n" for i in range(40))


def test_jsonl_parquet_array_record_read_the_text_field(tmp_path):
  docs = [f"doc {i} é" for i in range(20)]
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"content": docs, "n": list(range(20))}), tmp_path / "d.parquet")
  from array_record.python.array_record_module import ArrayRecordWriter
  w = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
  for i, t in enumerate(docs):
    w.write(json.dumps({"text": t}).encode() if i % 2 else t.encode())  # JSON records and raw UTF-8
  w.close()
  for kind, name, field in (("jsonl", "d.jsonl", "text"), ("parquet", "d.parquet", "content"),
                            ("array_record", "d.array_record", "text")):
    d = _load(kind, tmp_path / name, text_field=field, val_fraction=0.1)
    assert sorted(d.train + d.val) == sorted(docs), kind
    assert len(d.val) == 2


def test_non_utf8_bytes_are_replaced_counted_and_warned_once(tmp_path):
  (tmp_path / "bad.txt").write_bytes(b"good line\nbad \xff\xfe bytes\n" * 20)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cfg = file_config("text", tmp_path / "bad.txt", T=8)
    pipe = data.build_pipeline(cfg.data, tokenizers.ByteTokenizer(), seed=0, batch_size=2,
                               cache_dir=str(tmp_path / "c"))
  msgs = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
  assert len(msgs) == 1 and str(tmp_path / "bad.txt") in msgs[0] and "40 invalid UTF-8" in msgs[0]
  assert pipe.stats(step=0)["sources"]["f"]["non_utf8_replacements"] == 40


def test_stdlib_code_is_sorted_deterministic_and_skips_tests():
  files = stdlib_corpus.stdlib_files()
  assert files == sorted(files) and len(files) > 300
  assert not [f for f in files if "/test/" in f or "/tests/" in f or "site-packages" in f]
  assert any(f.endswith("/json/decoder.py") for f in files)


def test_stdlib_prose_has_docstrings_and_topic_pages():
  docs = stdlib_corpus.prose_documents(lambda p: open(p, encoding="utf-8", errors="replace").read())
  assert len(docs) > 500
  from pydoc_data import topics
  assert topics.topics["if"].strip() in docs
  json_doc = next(d for d in docs if d.startswith("JSON (JavaScript Object Notation)"))
  assert "def " not in json_doc[:200]


def _read(path):
  return open(path, encoding="utf-8", errors="replace").read()


def _parsed_here(texts):
  """The reference: each text parsed now, nothing memoised or read from a cache."""
  return [stdlib_corpus._module_docstrings(t) for t in texts]


def test_cached_docstrings_are_what_parsing_gives_from_memory_and_from_the_file(tmp_path, monkeypatch):
  texts = [_read(p) for p in stdlib_corpus.stdlib_files()[::12]]  # 60-odd modules, nested defs among them
  want = _parsed_here(texts)
  monkeypatch.setattr(stdlib_corpus, "_DOCSTRINGS", {})
  assert stdlib_corpus.docstring_documents(texts, str(tmp_path)) == want  # parsed, then written
  (cache_file,) = tmp_path.iterdir()
  assert cache_file.name == stdlib_corpus._cache_name()
  assert stdlib_corpus.docstring_documents(texts, str(tmp_path)) == want  # from this process's memo
  monkeypatch.setattr(stdlib_corpus, "_DOCSTRINGS", {})
  parse = stdlib_corpus._module_docstrings
  monkeypatch.setattr(stdlib_corpus, "_module_docstrings", lambda t: pytest.fail("parsed a cached text"))
  assert stdlib_corpus.docstring_documents(texts, str(tmp_path)) == want  # from the file, nothing parsed
  changed = texts[0] + '\n\ndef added():\n  """A docstring the cache has never seen."""\n'
  monkeypatch.setattr(stdlib_corpus, "_module_docstrings", parse)
  assert stdlib_corpus.docstring_documents([changed], str(tmp_path)) == _parsed_here([changed])
  assert "A docstring the cache has never seen." in stdlib_corpus.docstring_documents([changed])[0]


def test_a_damaged_docstring_cache_is_warned_parsed_again_and_rewritten(tmp_path, monkeypatch):
  texts = [_read(p) for p in stdlib_corpus.stdlib_files()[:5]]
  monkeypatch.setattr(stdlib_corpus, "_DOCSTRINGS", {})
  path = tmp_path / stdlib_corpus._cache_name()
  path.write_text('{"format": 1, "documents": {"ab')  # cut short by a full disk
  with pytest.warns(DataWarning, match="unreadable.*parsing the modules again"):
    assert stdlib_corpus.docstring_documents(texts, str(tmp_path)) == _parsed_here(texts)
  assert len(json.loads(path.read_text())["documents"]) == len(set(texts))


def test_max_documents_caps_with_a_seeded_subsample(tmp_path):
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"d{i}"}) + "\n" for i in range(100)))
  a = _load("jsonl", tmp_path / "d.jsonl", max_documents=10, val_fraction=0.2)
  b = _load("jsonl", tmp_path / "d.jsonl", max_documents=10, val_fraction=0.2)
  assert len(a.train) == 8 and len(a.val) == 2 and a.train == b.train


@pytest.mark.parametrize("packing", ["concat", "window"])
def test_eval_batches_come_from_the_validation_split_only(tmp_path, packing):
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": chr(65 + i) * 40}) + "\n" for i in range(20)))
  cfg = file_config("jsonl", tmp_path / "d.jsonl", T=8, val_fraction=0.1)
  cfg.data.packing = packing
  pipe = data.build_pipeline(cfg.data, tokenizers.ByteTokenizer(), seed=0, batch_size=2, cache_dir=str(tmp_path / "c"))
  val = sources.load_source("f", cfg.data.sources.f).val
  with pytest.warns(DataWarning, match="data.sources.f: eval asks for 12 rows, the validation split has 10"):
    ev = pipe.eval_batches("f", num_batches=3, batch_size=4)
    again = pipe.eval_batches("f", num_batches=3, batch_size=4)
  assert pipe.stats(step=0)["sources"]["f"]["val_rows"] == 10
  assert len(ev) == 3 and all(e["inputs"].shape == (4, 8) for e in ev)
  for e, f in zip(ev, again):
    np.testing.assert_array_equal(e["inputs"], f["inputs"])
  val_letters = {ord(d[0]) for d in val}
  assert len(val_letters) == 2  # 2 of the 20 single-letter documents
  seen = set(np.concatenate([e["targets"][e["targets"] < 256] for e in ev]).tolist())
  assert seen == val_letters
