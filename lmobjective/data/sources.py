"""Sources: read each configured source into documents and split them into train / validation.

A split never leaks: a single text file → its last `val_fraction` (cut at a line break);
anything with many documents → a seeded, fixed document split (independent of the training
seed, so changing `cfg.seed` never moves documents between splits).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import warnings
from typing import Any

import numpy as np

from lmobjective.config import ConfigError
from lmobjective.data import fingerprint as fingerprint_lib
from lmobjective.data import stdlib_corpus, stdlib_tasks, synthetic
from lmobjective.data.errors import DataWarning

BUILTIN_KINDS = ("python_stdlib", "stdlib_prose", "markov", "stdlib_chat", "stdlib_pairs")
FILE_KINDS = ("text", "jsonl", "parquet", "array_record", "chat_jsonl", "preference_jsonl", "prompts_jsonl")
KINDS = BUILTIN_KINDS + FILE_KINDS
CHAT_KINDS = ("chat_jsonl", "stdlib_chat")  # conversations: SFT rendering, padded rows
PAIR_KINDS = ("preference_jsonl", "stdlib_pairs")  # preference pairs: two rows per pair
PROMPT_KINDS = ("prompts_jsonl",)  # prompts to sample from (reward maximisation; `data/prompts.py` reads them)
EXCLUDING_KINDS = ("python_stdlib", "stdlib_prose")  # the kinds `exclude_modules` applies to
_SPLIT_SEED = 0x53504C4954  # fixed: the validation set must not depend on the run seed
_ROLES = ("system", "user", "assistant")


@dataclasses.dataclass
class SourceDocs:
  """Documents of one source: str for text kinds; list of {'role','content'} dicts for CHAT_KINDS;
  for PAIR_KINDS one pair {'prompt': str | messages, 'chosen': str, 'rejected': str} (responses
  as the assistant's content), so the split and max_documents count pairs."""
  name: str
  train: list[Any]
  val: list[Any]
  info: dict[str, Any]


def key(name: str, field: str) -> str:
  return f"data.sources.{name}.{field}"


def resolve_paths(name: str, path: str | None) -> list[str]:
  if not path:
    raise ConfigError(key(name, "path"), path, "required for this source kind")
  files = []
  for part in (p.strip() for p in path.split(",") if p.strip()):
    p = os.path.expanduser(part)
    if os.path.isdir(p):
      found = sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True) if os.path.isfile(f))
    else:
      found = sorted(glob.glob(p, recursive=True))
    if not found:
      raise ConfigError(key(name, "path"), part, "matches no file")
    files += found
  if not files:
    raise ConfigError(key(name, "path"), path, "names no file")
  return files


def fingerprint(name: str, scfg) -> str:
  """What the source's content depends on, cheap to compute (file sizes and mtimes, not bytes)."""
  if scfg.kind in EXCLUDING_KINDS:
    return stdlib_corpus.fingerprint(excluded(name, scfg))
  if scfg.kind in ("stdlib_chat", "stdlib_pairs"):
    return f"{stdlib_corpus.fingerprint()}|{scfg.kind} {stdlib_tasks.code_digest()}"
  if scfg.kind == "markov":
    return "markov"
  return json.dumps([(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in resolve_paths(name, scfg.path)])


def excluded(name: str, scfg) -> tuple[str, ...]:
  """The stdlib modules a python_stdlib / stdlib_prose source leaves out (sorted; refused if unknown)."""
  return stdlib_corpus.parse_modules(key(name, "exclude_modules"), scfg.exclude_modules)


def content_fingerprint(name: str, scfg) -> dict[str, Any]:
  """What a checkpoint records of the source's content (`fingerprint.py`: sizes and sampled blocks)."""
  if scfg.kind in BUILTIN_KINDS:
    return fingerprint_lib.of_builtin(fingerprint(name, scfg))
  return fingerprint_lib.of_files(resolve_paths(name, scfg.path))


def nul_offset(raw: bytes) -> int | None:
  """Where `raw` has its first NUL byte (text never has one: a binary file), or None."""
  at = raw.find(b"\0")
  return None if at < 0 else at


class _Reader:
  """Decodes bytes as UTF-8; invalid bytes become U+FFFD, counted, with one warning per file.

  A user's file (not the built-in corpora) that is binary is refused instead of repaired: a NUL
  byte, or invalid UTF-8 in more than a quarter of its bytes, would train on U+FFFD noise.
  """

  def __init__(self, name: str):
    self.name, self.replacements = name, 0

  def text(self, raw: bytes, where: str, check: bool = True) -> str:
    if check and (at := nul_offset(raw)) is not None:
      raise ConfigError(key(self.name, "path"), where, f"is not text (NUL bytes at offset {at})")
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      first = e.start
    text = raw.decode("utf-8", errors="replace")
    n = text.count("\ufffd")
    if check and 4 * n > len(raw):
      raise ConfigError(key(self.name, "path"), where, f"is not UTF-8 text ({n} invalid byte sequences in "
                        f"{len(raw)} bytes, the first at offset {first})")
    self.replacements += n
    warnings.warn(f"data.sources.{self.name}: {where}: {n} invalid UTF-8 byte sequence(s) replaced "
                  "with U+FFFD", DataWarning, stacklevel=2)
    return text

  def file(self, path: str, builtin: bool = False) -> str:
    """A user's file (refused if empty or binary); `builtin`: a file of the built-in corpora."""
    with open(path, "rb") as f:
      raw = f.read()
    if not builtin and not raw.strip():
      raise ConfigError(key(self.name, "path"), path, "file is empty")
    return self.text(raw, path, check=not builtin)


def load_source(name: str, scfg, cache_dir: str | None = None) -> SourceDocs:
  """The source's documents, split; `cache_dir` keeps what is slow to derive (`stdlib_corpus`'s docstrings)."""
  reader, info = _Reader(name), {"kind": scfg.kind}
  if scfg.kind == "text":
    files = resolve_paths(name, scfg.path)
    docs = [reader.file(f) for f in files]
    if len(docs) == 1:
      train, val = _tail_split(docs[0], scfg.val_fraction)
      return _finish(name, scfg, [train] if train else [], [val] if val else [], info, reader)
  elif scfg.kind == "python_stdlib":
    docs = stdlib_corpus.code_documents(lambda p: reader.file(p, builtin=True), excluded(name, scfg))
  elif scfg.kind == "stdlib_prose":
    docs = stdlib_corpus.prose_documents(lambda p: reader.file(p, builtin=True), excluded(name, scfg), cache_dir)
  elif scfg.kind in ("stdlib_chat", "stdlib_pairs"):  # split by held-out module, then capped
    splits = stdlib_tasks.chat_splits if scfg.kind == "stdlib_chat" else stdlib_tasks.pair_splits
    train, val, more = splits(scfg.val_fraction, scfg.max_documents)
    return _finish(name, scfg, train, val, {**info, **more}, reader)
  elif scfg.kind == "markov":
    docs, chain = synthetic.markov_documents(scfg.markov)
    info["entropy_rate_nats"] = chain.entropy_rate_nats()
    info["entropy_rate_bits_per_byte"] = chain.entropy_rate_bits()
  elif scfg.kind in ("jsonl", "chat_jsonl", "preference_jsonl"):
    per_file = [(f, _jsonl(name, scfg, f, reader)) for f in resolve_paths(name, scfg.path)]
    docs = [d for _, ds in per_file for d in ds]
    if scfg.kind == "preference_jsonl":
      read = [f for f, ds in per_file if ds]
      with_margin = [f for f, ds in per_file if ds and MARGIN in ds[0]]
      if with_margin and len(with_margin) < len(read):
        raise ConfigError(key(name, "path"), scfg.path, f"{with_margin[0]} gives each pair a '{MARGIN}', "
                          f"{next(f for f in read if f not in with_margin)} does not: every pair needs one, or none")
      info["pairs_with_margin"] = bool(with_margin)
  elif scfg.kind == "parquet":
    docs = [d for f in resolve_paths(name, scfg.path) for d in _parquet(name, scfg, f, reader)]
  elif scfg.kind == "array_record":
    docs = [d for f in resolve_paths(name, scfg.path) for d in _array_record(name, scfg, f, reader)]
  else:
    raise ConfigError(key(name, "kind"), scfg.kind, f"must be one of {', '.join(KINDS)}")
  docs = _cap(docs, scfg.max_documents)
  train, val = _document_split(docs, scfg.val_fraction)
  return _finish(name, scfg, train, val, info, reader)


def _where(name, scfg) -> tuple[str, Any]:
  """The key and value naming a source's data: its path (file kinds) or its kind (built-in)."""
  return (key(name, "path"), scfg.path) if scfg.kind in FILE_KINDS else (key(name, "kind"), scfg.kind)


def _finish(name, scfg, train, val, info, reader) -> SourceDocs:
  if not train:
    raise ConfigError(*_where(name, scfg), f"source '{name}' has no training documents after the validation split")
  if scfg.kind in CHAT_KINDS:
    _check_answers(name, scfg, train)
  if scfg.val_fraction > 0 and not val:
    raise ConfigError(key(name, "val_fraction"), scfg.val_fraction,
                      f"source '{name}' has no validation documents after the split")
  info["non_utf8_replacements"] = reader.replacements
  return SourceDocs(name, train, val, info)


def _check_answers(name, scfg, train: list[list[dict]]) -> None:
  """Conversations whose assistant turns are all empty would teach the model to answer with <|end|> at
  once (a pair's empty response is refused the same way); some empty turns among others are kept."""
  answers = [m["content"] for conv in train for m in conv if m["role"] == "assistant"]
  if answers and not any(answers):
    raise ConfigError(*_where(name, scfg), f"every assistant turn is empty ({len(answers)} in the train split of "
                      f"source '{name}'): it would train the model to answer with <|end|> at once")


def _tail_split(text: str, val_fraction: float) -> tuple[str, str]:
  if val_fraction <= 0:
    return text, ""
  cut = int(len(text) * (1 - val_fraction))
  nl = text.find("\n", cut)
  cut = nl + 1 if 0 <= nl < len(text) - 1 else cut
  return text[:cut], text[cut:]


def _cap(docs: list, max_documents: int | None) -> list:
  if max_documents is None or len(docs) <= max_documents:
    return docs
  keep = np.sort(np.random.default_rng([_SPLIT_SEED, 1]).permutation(len(docs))[:max_documents])
  return [docs[i] for i in keep]


def _document_split(docs: list, val_fraction: float) -> tuple[list, list]:
  n = len(docs)
  n_val = 0 if val_fraction <= 0 or n == 0 else max(1, int(round(val_fraction * n)))
  is_val = np.zeros(n, bool)
  is_val[np.random.default_rng([_SPLIT_SEED, n]).permutation(n)[:n_val]] = True
  return [d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v]


def _record_text(name, scfg, rec: Any, where: str):
  if scfg.kind == "chat_jsonl":
    return _conversation(name, rec, where)
  if scfg.kind == "preference_jsonl":
    return _pair(name, rec, where)
  if not isinstance(rec, dict) or scfg.text_field not in rec:
    what = "has no field of that name" if isinstance(rec, dict) else f"is a JSON {type(rec).__name__}, not an object"
    raise ConfigError(key(name, "text_field"), scfg.text_field, f"{where}: record {what}")
  if not isinstance(rec[scfg.text_field], str):
    raise ConfigError(key(name, "text_field"), scfg.text_field,
                      f"{where}: the field holds a JSON {type(rec[scfg.text_field]).__name__}, not a string")
  return rec[scfg.text_field]


def _conversation(name, rec, where) -> list[dict]:
  msgs = rec.get("messages") if isinstance(rec, dict) else None
  if not _messages_ok(msgs):
    raise ConfigError(key(name, "path"), where,
                      "chat record must be {'messages': [{'role': system|user|assistant, 'content': str}, ...]}")
  return [{"role": m["role"], "content": m["content"]} for m in msgs]


_PAIR_FIELDS = ("prompt", "chosen", "rejected")  # TRL's names
MARGIN = "margin"  # optional per pair (TRL's RewardTrainer column): r_w − r_l is pushed past it


def _messages_ok(msgs) -> bool:
  return isinstance(msgs, list) and all(
      isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str) for m in msgs)


def _response(name, rec, field: str, chat: bool, where: str) -> str:
  """A response as the assistant's content: a string, or (chat) [{'role': 'assistant', 'content': str}]."""
  r = rec[field]
  if chat and isinstance(r, list) and len(r) == 1 and _messages_ok(r) and r[0]["role"] == "assistant":
    r = r[0]["content"]
  if not isinstance(r, str):
    want = "a string or [{'role': 'assistant', 'content': str}]" if chat else "a string (as the prompt is)"
    raise ConfigError(key(name, "path"), where, f"preference record: '{field}' must be {want}, not {r!r:.60}")
  if not r:
    raise ConfigError(key(name, "path"), where, f"preference record: '{field}' is empty")
  return r


def _pair(name, rec, where) -> dict:
  """{'prompt', 'chosen', 'rejected'}: plain (three strings) or chat (prompt messages ending in a user turn)."""
  if not isinstance(rec, dict) or any(f not in rec for f in _PAIR_FIELDS):
    what = (f"has no '{next(f for f in _PAIR_FIELDS if f not in rec)}' field" if isinstance(rec, dict)
            else f"is a JSON {type(rec).__name__}, not an object")
    raise ConfigError(key(name, "path"), where, f"preference record {what} (needs prompt, chosen, rejected)")
  prompt = _prompt(name, rec["prompt"], where)
  pair = {"prompt": prompt, **{f: _response(name, rec, f, isinstance(prompt, list), where) for f in _PAIR_FIELDS[1:]}}
  if MARGIN in rec:
    m = rec[MARGIN]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
      raise ConfigError(key(name, "path"), where, f"preference record: '{MARGIN}' must be a finite number, not {m!r:.60}")
    pair[MARGIN] = float(m)
  return pair


def _prompt(name, prompt, where) -> str | list[dict]:
  if isinstance(prompt, str):
    return prompt
  if not _messages_ok(prompt):
    raise ConfigError(key(name, "path"), where, "preference record: 'prompt' must be a string or a list of "
                      "{'role': system|user|assistant, 'content': str}")
  if not prompt or prompt[-1]["role"] != "user":
    what = f"its last turn is {prompt[-1]['role']}" if prompt else "the list is empty"
    raise ConfigError(key(name, "path"), where, f"preference record: 'prompt' must end with a user turn ({what})")
  return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _jsonl(name, scfg, path, reader) -> list:
  out = []
  for i, line in enumerate(reader.file(path).split("\n")):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(key(name, "path"), f"{path}:{i + 1}", f"invalid JSON ({e.msg})") from None
    out.append(_record_text(name, scfg, rec, f"{path}:{i + 1}"))
    if scfg.kind == "preference_jsonl" and (MARGIN in out[0]) != (MARGIN in out[-1]):
      raise ConfigError(key(name, "path"), f"{path}:{i + 1}", f"preference record {'has' if MARGIN in out[-1] else 'lacks'} "
                        f"a '{MARGIN}' the first record of the file {'lacks' if MARGIN in out[-1] else 'has'}: every "
                        "pair needs one, or none")
  return out


def _first_sentence(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return lines[0].split(". ")[0].rstrip(".") if lines else type(e).__name__


def _parquet(name, scfg, path, reader) -> list[str]:
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    schema = pq.read_schema(path)
    if scfg.text_field not in schema.names:
      raise ConfigError(key(name, "text_field"), scfg.text_field, f"{path}: no such column (has {schema.names})")
    col = pq.read_table(path, columns=[scfg.text_field]).column(scfg.text_field)
  except (pa.ArrowException, OSError) as e:
    raise ConfigError(key(name, "path"), path, f"is not a Parquet file ({_first_sentence(e)})") from None
  kind = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
  if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
    return [reader.text(b, f"{path} row {i}") for i, b in enumerate(col.to_pylist()) if b]
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    raise ConfigError(key(name, "text_field"), scfg.text_field,
                      f"{path}: the column holds {col.type}, not text (string or binary)")
  return [t for t in col.to_pylist() if t]


def _json_or_raw_text(name, scfg, text: str, where: str) -> str:
  """A record that parses as a JSON object gives its text field; anything else is the text itself."""
  if text.lstrip().startswith("{"):
    try:
      return _record_text(name, scfg, json.loads(text), where)
    except json.JSONDecodeError:
      return text
  return text


def _array_record(name, scfg, path, reader) -> list[str]:
  import grain
  out = []
  try:
    src = grain.sources.ArrayRecordDataSource([path])
    records = [src[i] for i in range(len(src))]
  except RuntimeError as e:  # how array_record reports a damaged or foreign file
    raise ConfigError(key(name, "path"), path, f"is not an ArrayRecord file ({_first_sentence(e)})") from None
  for i, raw in enumerate(records):
    text = reader.text(raw, f"{path}[{i}]")
    out.append(_json_or_raw_text(name, scfg, text, f"{path}[{i}]"))
  return [t for t in out if t]
