"""The safetensors files of a Hugging Face model directory, read slice by slice.

One `model.safetensors`, or `model.safetensors.index.json` (`{"metadata": ..., "weight_map": {key: file}}`)
and its shards. `safe_open` checks each file and gives keys, shapes and dtypes; `view(key)` is the tensor
as a read-only NumPy view of the memory-mapped file (the format: an 8-byte little-endian header length,
the JSON header with each tensor's dtype, shape and byte offsets, then the bytes), so slicing, transposing
and converting a slice touches only that slice's pages and makes one copy, the one the caller keeps.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
from safetensors import safe_open

from lmobjective.hf.configs import HFError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsDir:

  def __init__(self, path: str):
    self.path = path
    self._handles: dict[str, object] = {}  # file -> its open safe_open (memory-mapped once)
    self._maps: dict[str, tuple[np.memmap, dict]] = {}  # file -> (its bytes, its header)
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

  def view(self, key: str) -> np.ndarray:
    """`key` as a read-only view of its file's pages (nothing is read until it is sliced and copied)."""
    file = self.files[key]
    if file not in self._maps:
      self._open(file)  # safetensors' own check of the file first
      with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
      self._maps[file] = (np.memmap(file, np.uint8, mode="r", offset=8 + n), header)
    data, header = self._maps[file]
    entry = header[key]
    begin, end = entry["data_offsets"]
    return data[begin:end].view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

  def read(self, key: str, index=None, dtype=np.float32) -> np.ndarray:
    """The slice `index` (a tuple of slices, as `make_array_from_callback` passes; None = all) of `key`,
    a new array of `dtype`."""
    part = self.view(key)
    return np.array(part if index is None else part[index], dtype=dtype)
