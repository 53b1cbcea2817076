"""docs/config.md is generated from configs/default.py (`lmobjective.config_doc`) and kept current:
the committed page equals what the module prints, names every leaf key, and carries the file's comments."""

import os

import pytest

from lmobjective import config as config_lib
from lmobjective import config_doc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "config.md")


@pytest.fixture(scope="module")
def committed():
  with open(PAGE, encoding="utf-8") as f:
    return f.read()


@pytest.fixture(scope="module")
def generated():
  return config_doc.markdown()


def _row(page: str, key: str) -> str:
  rows = [line for line in page.splitlines() if line.startswith(f"| `{key}` |")]
  assert len(rows) == 1, f"{key}: {len(rows)} rows"
  return rows[0]


def test_the_committed_page_is_what_the_module_generates(committed, generated):
  assert committed == generated, f"docs/config.md is stale: run `{config_doc.COMMAND}`"


def test_every_leaf_key_of_the_default_config_has_a_row(committed):
  names = [name for name, _, _ in config_doc.leaves(config_lib.load_config_file(config_lib.DEFAULT_CONFIG))]
  assert len(names) > 100  # three sources of 18 keys each, and the other sections
  for name in names:
    _row(committed, name)


def test_a_key_gets_the_comments_written_beside_and_above_it(committed):
  assert _row(committed, "data.context_length") == (
      "| `data.context_length` | `128` | tokens per training example (inputs; targets shifted by one) |")
  # A block above the key, and a placeholder's declared type; a source's keys carry the helper's comments.
  assert "| `None` (str) | A stage that starts from another run: \"WORKDIR\" (its newest checkpoint)" in _row(
      committed, "train.init_from")
  assert _row(committed, "data.sources.prose.markov.concentration").endswith(
      "| `0.2` | Dirichlet concentration of each transition row (lower = lower entropy) |")
  # A '|' inside a comment is escaped, so the table keeps three columns.
  assert "| `\"adamw\"` | adamw \\| muon — adamw: every parameter." in _row(committed, "optimizer.kind")


def test_comments_are_read_from_the_file_not_guessed(tmp_path):
  """Made to fail on purpose: a comment moved to another key in a copy of the file moves on the page."""
  src = open(config_lib.DEFAULT_CONFIG, encoding="utf-8").read()
  line = "  c.data.context_length = 128  # tokens per training example (inputs; targets shifted by one)\n"
  assert line in src
  moved = src.replace(line, "  # not the original comment\n  c.data.context_length = 128\n")
  path = tmp_path / "default.py"
  path.write_text(moved)
  page = config_doc.markdown(str(path))
  assert _row(page, "data.context_length") == "| `data.context_length` | `128` | not the original comment |"
