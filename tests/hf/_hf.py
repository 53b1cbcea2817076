"""The Hugging Face fixtures (tests/fixtures/hf, made by tests/fixtures/make_hf_refs.py with torch and
transformers) and one import of each, shared by the tests of this folder."""

import functools
import os
import shutil
import sys

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests"))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
MODELS = ("gpt2", "llama", "llama_headdim", "qwen2", "qwen3")


def fixture_dir(name: str) -> str:
  return os.path.join(FIXTURES, name)


@functools.lru_cache(maxsize=None)
def refs(name: str) -> dict:
  with np.load(os.path.join(fixture_dir(name), "refs.npz"), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


@functools.lru_cache(maxsize=None)
def imported(name: str):
  """(Transformer, params, hf config) of fixture `name` on one device."""
  from lmobjective.hf import load
  return load.import_model(fixture_dir(name))





def hf_copy(tmp_path, name: str) -> str:
  """A writable copy of fixture directory `name` under `tmp_path` (for damaging it)."""
  out = os.path.join(str(tmp_path), name)
  shutil.copytree(fixture_dir(name), out)
  return out
