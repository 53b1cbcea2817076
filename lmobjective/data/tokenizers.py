"""Tokenizers: SentencePiece (bpe | unigram), character-level, byte-level and a Hugging Face tokenizer.json
(kind hf), behind one interface.

All three round-trip exactly (decode(encode(x)) == x) and know how many UTF-8 bytes each
token stands for (`token_byte_lengths`), so bits-per-byte is exact. Special ids: pad, EOS
(control: 0 bytes) and the chat markers of `sft.py` (user-defined pieces: their own bytes).
SentencePiece keeps code intact: identity normalisation, no dummy prefix, no whitespace
folding, whitespace-only pieces allowed (indentation), "\\n" a user-defined piece, byte
fallback for rare characters.
"""

from __future__ import annotations

import abc

import hashlib
import io
import itertools
import json
import os

import numpy as np
import sentencepiece as spm

from lmobjective import files
from lmobjective.config import ConfigError
from lmobjective.data.errors import DataError

CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
META_FILE = "tokenizer.json"
SPM_FILE = "spm.model"
HF_FILE = "hf_tokenizer.json"  # a saved kind=hf tokenizer's own tokenizer.json (META_FILE is this package's)


class Tokenizer(abc.ABC):
  """Common interface. Subclasses set kind, vocab_size, pad_id, eos_id and implement the encoders."""
  kind: str
  vocab_size: int
  pad_id: int
  eos_id: int

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    ...

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(all ids concatenated int64, per-text lengths int64): the fast path for caching."""
    ids = self.encode_batch(texts)
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), np.int64, count=int(lengths.sum())), lengths

  @abc.abstractmethod
  def decode(self, ids) -> str:
    ...

  @property
  def opener_id(self) -> int:
    """The id a document opens with when it is scored or prompted on its own: EOS, the separator the
    pipeline puts between documents (an imported tokenizer may open with BOS: `HFTokenizer`)."""
    return self.eos_id

  @abc.abstractmethod
  def token_byte_lengths(self) -> np.ndarray:
    ...

  @abc.abstractmethod
  def special_id(self, marker: str) -> int:
    ...

  @abc.abstractmethod
  def payload(self) -> bytes:
    """The bytes that define this tokenizer (its fingerprint is their hash)."""

  def fingerprint(self) -> str:
    return hashlib.sha256(self.kind.encode() + b"\0" + self.payload()).hexdigest()[:16]

  def check_ids(self, ids: np.ndarray, where: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise DataError(f"{where}: token ids outside the vocabulary [0, {self.vocab_size}) "
                      f"(min {ids.min()}, max {ids.max()})")


class SentencePieceTokenizer(Tokenizer):
  kind = "sentencepiece"

  def __init__(self, model_proto: bytes, num_threads: int | None = None):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._threads = num_threads or os.cpu_count() or 1
    self.vocab_size, self.pad_id, self.eos_id = self._sp.vocab_size(), self._sp.pad_id(), self._sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=self._threads)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def token_byte_lengths(self) -> np.ndarray:
    sp, out = self._sp, np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        continue
      out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out

  def special_id(self, marker: str) -> int:
    return self._sp.piece_to_id(marker)

  def payload(self) -> bytes:
    return self._proto


class _TableTokenizer(Tokenizer):
  """Tokenizers defined by a table id -> the bytes it stands for (byte and char kinds)."""

  def _set_table(self, id_bytes: list[bytes]) -> None:
    self._id_bytes = id_bytes
    self.vocab_size = len(id_bytes)

  def decode(self, ids) -> str:
    return b"".join(self._id_bytes[int(i)] for i in ids).decode("utf-8", errors="replace")

  def token_byte_lengths(self) -> np.ndarray:
    return np.array([len(b) for b in self._id_bytes], np.int32)

  def special_id(self, marker: str) -> int:
    return self._marker_base + CHAT_MARKERS.index(marker)


class ByteTokenizer(_TableTokenizer):
  """ids 0..255 = bytes, then pad, EOS and the chat markers."""
  kind = "byte"

  def __init__(self):
    self.pad_id, self.eos_id, self._marker_base = 256, 257, 258
    self._set_table([bytes([b]) for b in range(256)] + [b"", b""] + [m.encode() for m in CHAT_MARKERS])

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_flat(self, texts):
    raw = [t.encode("utf-8") for t in texts]
    lengths = np.fromiter(map(len, raw), np.int64, count=len(raw))
    return np.frombuffer(b"".join(raw), np.uint8).astype(np.int64), lengths

  def payload(self) -> bytes:
    return b"byte-v1"


class CharTokenizer(_TableTokenizer):
  """pad, EOS, chat markers, 256 fallback bytes (for characters not seen in training), then characters."""
  kind = "char"
  _BYTE_BASE = 2 + len(CHAT_MARKERS)

  def __init__(self, chars: str):
    self.chars = "".join(sorted(set(chars)))
    self.pad_id, self.eos_id, self._marker_base = 0, 1, 2
    base = self._BYTE_BASE + 256
    self._set_table([b"", b""] + [m.encode() for m in CHAT_MARKERS] + [bytes([b]) for b in range(256)]
                    + [c.encode("utf-8") for c in self.chars])
    self._codepoints = np.array([ord(c) for c in self.chars], np.int64)
    self._char_ids = np.arange(base, base + len(self.chars), dtype=np.int64)

  def _encode_array(self, text: str) -> np.ndarray:
    cp = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
    pos = np.minimum(np.searchsorted(self._codepoints, cp), max(len(self._codepoints) - 1, 0))
    known = self._codepoints[pos] == cp if len(self._codepoints) else np.zeros(len(cp), bool)
    if known.all():
      return self._char_ids[pos]
    pieces = [[int(self._char_ids[p])] if k else [self._BYTE_BASE + b for b in ch.encode("utf-8")]
              for ch, p, k in zip(text, pos, known)]  # rare: only texts with unseen characters
    return np.fromiter(itertools.chain.from_iterable(pieces), np.int64)

  def encode(self, text: str) -> list[int]:
    return self._encode_array(text).tolist()

  def encode_flat(self, texts):
    arrays = [self._encode_array(t) for t in texts]
    lengths = np.fromiter(map(len, arrays), np.int64, count=len(arrays))
    return (np.concatenate(arrays) if arrays else np.zeros(0, np.int64)), lengths

  def payload(self) -> bytes:
    return self.chars.encode("utf-8", errors="surrogatepass")


# ---- Hugging Face tokenizer.json ---------------------------------------------------------------
# A Hugging Face `tokenizer.json` (the `tokenizers` library) behind this package's `Tokenizer` interface.
# 
# `tokenizer.json` does not say which token is BOS or EOS: `config.json` (`bos_token_id`, `eos_token_id`)
# does, else `tokenizer_config.json` (`bos_token`, `eos_token`). `encode` never adds special tokens (the
# post-processor's BOS, for example): where a document opens with BOS is the pipeline's and the scorer's
# decision (`opens_with_bos`). Bytes per token are exact for byte-level BPE (each character of a token
# stands for one byte: GPT-2's table) and for SentencePiece-style vocabularies (`▁` is a space, `<0xAB>`
# one byte); special tokens stand for none. A document opens with the token the tokenizer's own
# post-processor puts first (Llama's BOS), else with EOS (GPT-2's <|endoftext|>): `opener_id`.

HF_TOKENIZER_FILE = "tokenizer.json"  # a Hugging Face directory's own (this package's saved META_FILE has the same name)
HF_TOKENIZER_CONFIG = "tokenizer_config.json"


class HFTokenizer(Tokenizer):
  kind = "hf"

  def __init__(self, tokenizer_json: str, bos_id: int | None, eos_id: int | None, where: str = HF_TOKENIZER_FILE):
    import tokenizers  # the library (this module is lmobjective.data.tokenizers)
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
      raise ConfigError("data.tokenizer.kind", "hf", f"{HF_TOKENIZER_FILE} has no {marker!r}: chat messages need this package's "
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


def hf_model_config(path: str) -> dict:
  """`path/config.json` if there is one (the model's BOS and EOS ids), else {}."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    return {}
  with open(file, encoding="utf-8") as f:
    return json.load(f)


def load_hf(path: str, hf_config: dict | None = None) -> HFTokenizer:
  """The tokenizer of an HF model directory `path`, its BOS/EOS from `hf_config` (config.json), else from
  tokenizer_config.json."""
  file = os.path.join(path, HF_TOKENIZER_FILE)
  if not os.path.isfile(file):
    raise DataError(f"{path}: no {HF_TOKENIZER_FILE} (a Hugging Face tokenizer directory has one)")
  with open(file, encoding="utf-8") as f:
    text = f.read()
  tok_config = {}
  if os.path.isfile(os.path.join(path, HF_TOKENIZER_CONFIG)):
    with open(os.path.join(path, HF_TOKENIZER_CONFIG), encoding="utf-8") as f:
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


# ---- training ---------------------------------------------------------------------------


def train_sentencepiece(lines: list[str], tcfg) -> SentencePieceTokenizer:
  """Deterministic: the caller pre-samples `lines` with a seeded RNG; spm never shuffles."""
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type=tcfg.model_type,
        vocab_size=tcfg.vocab_size, byte_fallback=True, character_coverage=0.9995,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=2, user_defined_symbols=["\n", *CHAT_MARKERS],
        shuffle_input_sentence=False, input_sentence_size=0, max_sentence_length=1 << 14,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=False, hard_vocab_limit=True,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise ConfigError("data.tokenizer.vocab_size", tcfg.vocab_size, f"sentencepiece training failed: {msg}") from None
  return SentencePieceTokenizer(model.getvalue())


def train_char(lines: list[str]) -> CharTokenizer:
  return CharTokenizer("".join(lines) + "\n")


# ---- saving / loading -------------------------------------------------------------------


def spec(tcfg) -> dict:
  """The config fields a saved tokenizer must agree with."""
  if tcfg.kind == "sentencepiece":
    return {"kind": tcfg.kind, "model_type": tcfg.model_type, "vocab_size": tcfg.vocab_size}
  return {"kind": tcfg.kind}


def save(tok: Tokenizer, directory: str, tok_spec: dict) -> None:
  """Atomically: write into a temp dir, then rename it into place. If another process saved first,
  theirs is kept (same seeded training, same bytes)."""
  meta = {"kind": tok.kind, "spec": tok_spec, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size}
  if isinstance(tok, CharTokenizer):
    meta["chars"] = tok.chars
  if tok.kind == "hf":
    meta["bos_id"], meta["eos_id"] = tok.bos_id, tok.eos_id
  with files.atomic_path(directory, directory=True) as tmp:
    if isinstance(tok, SentencePieceTokenizer):
      with open(os.path.join(tmp, SPM_FILE), "wb") as f:
        f.write(tok.payload())
    if tok.kind == "hf":
      with open(os.path.join(tmp, HF_FILE), "w", encoding="utf-8") as f:
        f.write(tok.tokenizer_json())
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta, f, ensure_ascii=True, indent=1)


def load(path: str, key: str = "data.tokenizer.path") -> tuple[Tokenizer, dict]:
  """A tokenizer directory (tokenizer.json [+ spm.model | hf_tokenizer.json]), a Hugging Face model or
  tokenizer directory (its own tokenizer.json: kind hf), or a bare SentencePiece .model file."""
  if os.path.isfile(path):
    return _sentencepiece_file(path, key, path), {"kind": "sentencepiece"}
  meta_path = os.path.join(path, META_FILE)
  if not os.path.isfile(meta_path):
    raise ConfigError(key, path, f"no tokenizer here (expected a .model file or a directory with {META_FILE})")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
    if isinstance(meta, dict) and "kind" not in meta and "model" in meta:  # Hugging Face's own tokenizer.json
      return load_hf(path, hf_model_config(path)), {"kind": "hf"}
    kind = meta["kind"]
  except (ValueError, KeyError, TypeError):  # JSON or UTF-8 errors are ValueErrors
    raise ConfigError(key, path, f"{META_FILE} is damaged (not JSON naming the tokenizer's kind)") from None
  if kind == "sentencepiece":
    tok = _sentencepiece_file(os.path.join(path, SPM_FILE), key, path)
  elif kind == "char" and isinstance(meta.get("chars"), str):
    tok = CharTokenizer(meta["chars"])
  elif kind == "byte":
    tok = ByteTokenizer()
  elif kind == "hf" and os.path.isfile(os.path.join(path, HF_FILE)):
    with open(os.path.join(path, HF_FILE), encoding="utf-8") as f:
      tok = HFTokenizer(f.read(), meta.get("bos_id"), meta.get("eos_id"), where=os.path.join(path, HF_FILE))
  else:
    raise ConfigError(key, path, f"{META_FILE} is damaged (kind={kind!r})")
  return tok, meta.get("spec", {"kind": kind})


def _sentencepiece_file(model_path: str, key: str, path: str) -> SentencePieceTokenizer:
  try:
    with open(model_path, "rb") as f:
      return SentencePieceTokenizer(f.read())
  except OSError as e:
    raise ConfigError(key, path, f"cannot read {model_path} ({e.strerror})") from None
  except RuntimeError:  # sentencepiece's parse error is a multi-line C++ message
    what = "" if model_path == path else f"{model_path} "
    raise ConfigError(key, path, f"{what}is not a SentencePiece model") from None
