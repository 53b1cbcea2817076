"""analysis/documents.py and `evaluate --per_document`: one row per document whose sums add up to the
notebook's perplexity of the same texts, hand-computed summaries, one-line refusals before anything is
written."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf"))
from _hf import fixture_dir  # noqa: E402

from lmobjective.analysis import documents, inspection  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3,  # longer than the context: 8 windows
         "hello world", "día ünïcode → bytes"]


@pytest.fixture(scope="module")
def run():
  return inspection.restore_hf(fixture_dir("gpt2"), context_length=16)


def test_rows_add_up_to_the_perplexity_of_the_same_texts(run):
  rows = documents.score_documents(run, [(str(i), "s", t) for i, t in enumerate(TEXTS)])
  assert [r["tokens"] for r in rows] == [len(run.tokenizer.encode(t)) for t in TEXTS]
  assert rows[0]["tokens"] > 3 * run.context_length
  assert [r["bytes"] for r in rows] == [len(t.encode("utf-8")) for t in TEXTS]
  whole = run.perplexity(TEXTS)  # token-weighted over the same positions
  t = documents.totals(rows)
  assert t["tokens"] == whole["num_tokens"] and t["loss"] == pytest.approx(whole["loss"], rel=1e-6)  # float32 programs of other batch sizes
  assert t["bits_per_byte"] == pytest.approx(whole["bits_per_byte"], rel=1e-6)
  for r, text in zip(rows, TEXTS):
    one = run.perplexity([text])
    assert r["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert r["bits_per_byte"] == pytest.approx(-r["logprob"] / math.log(2) / r["bytes"], rel=1e-12)
  with pytest.raises(ValueError, match=r"^document 'b' of 's': is empty \(nothing to score\)$"):
    documents.score_documents(run, [("a", "s", "x"), ("b", "s", "")])


def test_summaries_by_hand():
  rows = [{"id": str(i), "source": src, "tokens": n, "bytes": 2 * n, "logprob": -lp}
          for i, (src, n, lp) in enumerate([("a", 10, 20.0), ("a", 100, 100.0), ("b", 300, 900.0), ("b", 50, 10.0)])]
  for r in rows:
    r["loss"], r["bits_per_byte"] = -r["logprob"] / r["tokens"], -r["logprob"] / math.log(2) / r["bytes"]
  assert [r["id"] for r in documents.worst(rows, 0.5)] == ["2", "0"]  # 1.5/ln2 and 1.0/ln2 bits per byte
  assert [r["id"] for r in documents.worst(rows, 0.01)] == ["2"]  # at least one
  by = documents.by_source(rows)
  assert by["a"]["loss"] == pytest.approx(120 / 110) and by["b"]["bits_per_byte"] == pytest.approx(910 / math.log(2) / 700)
  bins = documents.by_length(rows, edges=(64, 256))
  assert [(b["tokens_from"], b["documents"], b["loss"]) for b in bins] == [
      (0, 2, pytest.approx(30 / 60)), (64, 1, pytest.approx(1.0)), (256, 1, pytest.approx(3.0))]


@pytest.mark.parametrize("line, message", [
    ('{"id": 1}', r":2: needs a string 'text'$"),
    ('{"text": ""}', r":2: the document is empty \(nothing to score\)$"),
    ("{text", r":2: not JSON"),
])
def test_a_bad_documents_file_is_refused_in_one_line(tmp_path, line, message):
  path = tmp_path / "docs.jsonl"
  path.write_text('{"text": "fine"}\n' + line + "\n")
  with pytest.raises(ValueError, match=f"^--documents_file={path}" + message):
    documents.read_documents(str(path))


def test_per_document_cli_on_an_imported_model(tmp_path):
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(json.dumps({"id": f"d{i}", "source": "mine", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
  out = tmp_path / "scores.jsonl"
  args = [sys.executable, "-m", "lmobjective.evaluate", f"--hf={fixture_dir('gpt2')}", f"--documents_file={docs}",
          f"--per_document={out}"]
  r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  rows = documents.read_jsonl(str(out))
  assert [r_["id"] for r_ in rows] == ["d0", "d1", "d2"] and {r_["source"] for r_ in rows} == {"mine"}
  assert list(rows[0]) == list(documents.FIELDS)
  printed = dict(l.split(None, 1) for l in r.stdout.strip().splitlines()[:-1])
  t = documents.totals(rows)
  assert int(printed["tokens"]) == t["tokens"] and float(printed["loss"].split()[0]) == pytest.approx(t["loss"], abs=1e-6)
  # the same table again: refused before the model is read, and the table is untouched
  before = out.read_bytes()
  r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and r.stderr.strip().splitlines() == [
      f"error: --per_document={out}: exists (the table is never overwritten; remove it or pick another name)"]
  assert out.read_bytes() == before
  np.testing.assert_allclose([r_["logprob"] for r_ in rows],
                             [documents.score_documents(inspection.restore_hf(fixture_dir("gpt2")),
                                                        [("x", "s", t)])[0]["logprob"] for t in TEXTS], rtol=1e-6)
