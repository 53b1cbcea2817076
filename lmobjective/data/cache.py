"""Pre-tokenization cache: one compact .npz per (source content+config, tokenizer), written atomically.

Token ids are stored as uint16 when the vocabulary fits, else uint32. Each file records the
fingerprint of the tokenizer that wrote it; a file written by another tokenizer (or damaged)
is ignored with one warning and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np

from lmobjective import files
from lmobjective.data.errors import DataWarning

FORMAT = 1


def default_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "lmobjective")


def directory(data_cfg, override: str | None = None) -> str:
  """Where the caches of a run's data go: `override`, else `data.cache_dir`, else `default_dir()`."""
  return os.path.expanduser(override or data_cfg.cache_dir or default_dir())


def key(parts: dict) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def path_for(directory: str, name: str, source_key: str) -> str:
  return os.path.join(directory, f"{name}-{source_key}.npz")


def id_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 65535 else np.uint32


def save(path: str, arrays: dict[str, np.ndarray], meta: dict, vocab_size: int) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  out = {k: (v.astype(id_dtype(vocab_size)) if k.endswith("ids") else v) for k, v in arrays.items()}
  out["meta"] = np.array(json.dumps(meta | {"format": FORMAT}))
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **out)


def load(path: str, tokenizer_fingerprint: str) -> tuple[dict[str, np.ndarray], dict] | None:
  """The cached arrays and meta, or None (missing, foreign tokenizer or unreadable: warned)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
  except Exception as e:  # a truncated or foreign file must not stop the run: rebuild it
    warnings.warn(f"cache {path}: unreadable ({type(e).__name__}); re-tokenizing", DataWarning, stacklevel=2)
    return None
  if meta.get("tokenizer") != tokenizer_fingerprint or meta.get("format") != FORMAT:
    warnings.warn(f"cache {path}: written by tokenizer {meta.get('tokenizer')}, not {tokenizer_fingerprint}; "
                  "ignoring it and re-tokenizing", DataWarning, stacklevel=2)
    return None
  return arrays, meta
