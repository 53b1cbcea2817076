"""Small data configs derived from the default config (so the real defaults are exercised)."""

import os
import sys

import ml_collections
import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from configs import default  # noqa: E402


def markov_config(weights=(1.0,), T=16, tokenizer="byte", num_documents=200, document_length=300):
  """The default config with its sources replaced by small seeded Markov chains m0, m1, ... (fast, no files)."""
  c = default.get_config()
  c.data.context_length = T
  c.data.tokenizer.kind = tokenizer
  c.data.sources = ml_collections.ConfigDict()
  for i, w in enumerate(weights):
    s = default.source("markov", w)
    s.markov.seed, s.markov.num_documents, s.markov.document_length = 100 + i, num_documents, document_length
    c.data.sources[f"m{i}"] = s
  return c


def file_config(kind, path, T=16, **overrides):
  c = default.get_config()
  c.data.context_length = T
  c.data.tokenizer.kind = "byte"
  c.data.sources = ml_collections.ConfigDict()
  c.data.sources.f = default.source(kind, 1.0, path=str(path), **overrides)
  return c


@pytest.fixture
def cache_dir(tmp_path):
  return str(tmp_path / "cache")
