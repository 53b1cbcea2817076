"""The safetensors files of a Hugging Face model directory, read slice by slice.

One `model.safetensors`, or `model.safetensors.index.json` (`{"metadata": ..., "weight_map": {key: file}}`)
and its shards. Every read is `safe_open(...).get_slice(key)[index]`: the file is memory-mapped and only
the pages of the requested slice are touched, so a device's callback reads its own part of a tensor.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors import safe_open

from lmobjective.hf.configs import HFError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class SafetensorsDir:

  def __init__(self, path: str):
    self.path = path
    self._handles: dict[str, object] = {}  # file -> its open safe_open (memory-mapped once)
    index, single = os.path.join(path, INDEX), os.path.join(path, SINGLE)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise HFError(f"{index}: no weight_map")
      self.files = {k: os.path.join(path, v) for k, v in weight_map.items()}
      for file in sorted(set(self.files.values())):
        if not os.path.isfile(file):
          raise HFError(f"{index}: names {os.path.basename(file)}, which is not in {path}")
    elif os.path.isfile(single):
      self.files = {k: single for k in self._open(single).keys()}
    else:
      raise HFError(f"hf:{path}: neither {SINGLE} nor {INDEX}")

  def _open(self, file: str):
    if file not in self._handles:
      try:
        self._handles[file] = safe_open(file, framework="numpy")
      except Exception as e:  # safetensors raises its own error types for a damaged header
        raise HFError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return self._handles[file]

  def keys(self) -> list[str]:
    return sorted(self.files)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._open(self.files[key]).get_slice(key).get_shape())

  def dtype(self, key: str) -> str:
    return self._open(self.files[key]).get_slice(key).get_dtype()

  def where(self, key: str) -> str:
    return self.files[key]

  def read(self, key: str, index=None, dtype=np.float32) -> np.ndarray:
    """The slice `index` (a tuple of slices, as `make_array_from_callback` passes; None = all) of `key`."""
    part = self._open(self.files[key]).get_slice(key)
    index = tuple(slice(None) for _ in part.get_shape()) if index is None else index
    return np.asarray(part[index]).astype(dtype, copy=False)
