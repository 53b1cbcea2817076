"""A Hugging Face `tokenizer.json` (the `tokenizers` library) behind this package's `Tokenizer` interface.

`tokenizer.json` does not say which token is BOS or EOS: `config.json` (`bos_token_id`, `eos_token_id`)
does, else `tokenizer_config.json` (`bos_token`, `eos_token`). `encode` never adds special tokens (the
post-processor's BOS, for example): where a document opens with BOS is the pipeline's and the scorer's
decision (`opens_with_bos`). Bytes per token are exact for byte-level BPE (each character of a token
stands for one byte: GPT-2's table) and for SentencePiece-style vocabularies (`▁` is a space, `<0xAB>`
one byte); special tokens stand for none. A document opens with the token the tokenizer's own
post-processor puts first (Llama's BOS), else with EOS (GPT-2's <|endoftext|>): `opener_id`.
"""

from __future__ import annotations

import json
import os

import numpy as np

from lmobjective.config import ConfigError
from lmobjective.data.errors import DataError
from lmobjective.data.tokenizers import Tokenizer

FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


class HFTokenizer(Tokenizer):
  kind = "hf"

  def __init__(self, tokenizer_json: str, bos_id: int | None, eos_id: int | None, where: str = FILE):
    import tokenizers  # the library, not lmobjective.data.tokenizers
    self._json = tokenizer_json
    try:
      self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the library raises its own Exception type for a bad file
      raise DataError(f"{where}: not a tokenizers file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    # A document is text: a special token's string inside it ("<|endoftext|>" in a page about GPT-2) is
    # encoded as the characters it is, never as the control id (transformers' split_special_tokens=True;
    # tiktoken refuses such text by default). Specials enter only by id: the opener, EOS, chat markers.
    self._tok.encode_special_tokens = True
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    if eos_id is None:
      raise DataError(f"{where}: no EOS token (config.json has no eos_token_id, tokenizer_config.json no eos_token)")
    for name, i in (("bos", bos_id), ("eos", eos_id)):
      if i is not None and not 0 <= i < self.vocab_size:
        raise DataError(f"{where}: {name} id {i} outside the vocabulary [0, {self.vocab_size})")
    self.bos_id, self.eos_id = bos_id, eos_id
    self.pad_id = eos_id  # padding is masked everywhere; GPT-2 and Llama ship no pad token
    self._spec = json.loads(tokenizer_json)

  @property
  def opener_id(self) -> int:
    """What opens a document: the special token transformers' tokenizer prepends (Llama 3's BOS), else EOS."""
    with_specials = self._tok.encode("a", add_special_tokens=True).ids  # the post-processor's template
    plain = self._tok.encode("a", add_special_tokens=False).ids
    if len(with_specials) > len(plain) and with_specials[-len(plain):] == plain:
      return with_specials[0]
    return self.eos_id

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def _byte_level(self) -> bool:
    dec = self._spec.get("decoder") or {}
    kinds = [dec.get("type")] + [d.get("type") for d in dec.get("decoders", []) or []]
    return "ByteLevel" in kinds

  def token_byte_lengths(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.int32)
    special = {t["id"] for t in self._spec.get("added_tokens", []) if t.get("special")}
    byte_level = self._byte_level()
    for i in range(self.vocab_size):
      piece = self._tok.id_to_token(i)
      if piece is None or i in special:
        continue
      if byte_level and i not in {t["id"] for t in self._spec.get("added_tokens", [])}:
        out[i] = len(piece)  # one character of GPT-2's bytes_to_unicode table per byte
      elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        out[i] = 1  # SentencePiece byte fallback
      else:
        out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return out

  def special_id(self, marker: str) -> int:
    i = self._tok.token_to_id(marker)
    if i is None:
      raise ConfigError("data.tokenizer.kind", "hf", f"{FILE} has no {marker!r}: chat messages need this package's "
                        "chat markers, which are not added to an imported tokenizer yet; give plain-text prompts")
    return i

  def tokenizer_json(self) -> str:
    """The tokenizer.json it was read from (what an export writes)."""
    return self._json

  def payload(self) -> bytes:
    return json.dumps({"tokenizer": self._json, "bos": self.bos_id, "eos": self.eos_id}).encode()


def _token_id(tok_config: dict, field: str, vocab: dict) -> int | None:
  value = tok_config.get(field)
  if isinstance(value, dict):  # older files: {"content": "<s>", ...}
    value = value.get("content")
  return vocab.get(value) if isinstance(value, str) else None


def model_config(path: str) -> dict:
  """`path/config.json` if there is one (the model's BOS and EOS ids), else {}."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    return {}
  with open(file, encoding="utf-8") as f:
    return json.load(f)


def load(path: str, hf_config: dict | None = None) -> HFTokenizer:
  """The tokenizer of an HF model directory `path`, its BOS/EOS from `hf_config` (config.json), else from
  tokenizer_config.json."""
  file = os.path.join(path, FILE)
  if not os.path.isfile(file):
    raise DataError(f"{path}: no {FILE} (a Hugging Face tokenizer directory has one)")
  with open(file, encoding="utf-8") as f:
    text = f.read()
  tok_config = {}
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
      tok_config = json.load(f)
  vocab = {}
  try:
    spec = json.loads(text)
    vocab = dict((spec.get("model") or {}).get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
  except (ValueError, AttributeError, TypeError):
    pass  # HFTokenizer reports an unreadable file
  hf_config = hf_config or {}
  eos = hf_config.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) else eos
  bos = hf_config.get("bos_token_id")
  bos = _token_id(tok_config, "bos_token", vocab) if bos is None else bos
  eos = _token_id(tok_config, "eos_token", vocab) if eos is None else eos
  return HFTokenizer(text, bos, eos, where=file)
