"""Prompts for RL: a `prompts_jsonl` file, how a prompt is rendered, and the order prompts are taken in.

Each line is {"prompt": str | chat messages ending with a user turn, ...other fields}. The other
fields (an `answer`, a test case, ...) go to the reward functions as keywords, one list per field
(`rewards.py`), so every record must have the same field names. A chat prompt renders as SFT renders
it up to the assistant's content (`sft.render_prompt`); a plain prompt as [EOS] + enc(prompt), as
preference pairs render theirs.

Order: epoch e is the permutation `np.random.default_rng([seed, e]).permutation(num_prompts)`;
iteration i takes the next `batch_size` prompts of the concatenated epochs. The batch is a pure
function of i, so a resumed run needs only the iteration number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from lmobjective.config import ConfigError
from lmobjective.data import sft
from lmobjective.data.sources import _ROLES, _Reader, _messages_ok, key
from lmobjective.data.tokenizers import Tokenizer

KIND = "prompts_jsonl"
RESERVED_FIELDS = ("prompts", "completions")  # the keywords every reward function receives itself


@dataclasses.dataclass(frozen=True, eq=False)
class PromptSet:
  """A prompts file's records: the prompts and, per other field, the list of its values."""
  prompts: list  # [P] str | list[{'role', 'content'}]
  fields: dict[str, list]  # field -> [P] values
  fingerprint: str  # sha256 of the file's bytes, 16 hex digits
  path: str = ""  # the file read

  def __len__(self) -> int:
    return len(self.prompts)

  def take(self, indices) -> tuple[list, dict[str, list]]:
    """(prompts, fields) of the records at `indices` (any ints, repeats allowed), in that order."""
    idx = [int(i) for i in indices]
    return [self.prompts[i] for i in idx], {k: [v[i] for i in idx] for k, v in self.fields.items()}

  def subset(self, indices) -> "PromptSet":
    """The records at `indices` as a set of their own (a split); same file, same fingerprint."""
    prompts, fields = self.take(indices)
    return PromptSet(prompts, fields, self.fingerprint, self.path)


def load_prompts(name: str, path: str, config_key: str | None = None) -> PromptSet:
  """The records of `path`; a bad one stops the run with a one-line ConfigError naming file:line and
  `config_key` (default: data.sources.<name>.path)."""
  try:
    return _load(name, path)
  except ConfigError as e:
    if config_key is None:
      raise
    raise ConfigError(config_key, e.value, e.allowed) from None


def _load(name: str, path: str) -> PromptSet:
  if not path:
    raise ConfigError(key(name, "path"), path, f"required for a {KIND} source")
  if not os.path.isfile(path):
    raise ConfigError(key(name, "path"), path, "no such file")
  with open(path, "rb") as f:
    raw = f.read()
  if not raw.strip():
    raise ConfigError(key(name, "path"), path, "file is empty")
  text = _Reader(name).text(raw, path)
  prompts, fields, first = [], {}, None
  for i, line in enumerate(text.split("\n")):
    if not line.strip():
      continue
    where = f"{path}:{i + 1}"
    prompt, rest = _record(name, line, where)
    if first is None:
      first = _first_fields(name, rest, where)
      fields = {k: [] for k in first}
    elif sorted(rest) != first:
      raise ConfigError(key(name, "path"), where, f"prompt record has fields {sorted(rest)}, the first record "
                        f"{first}: every record needs the same fields (one list per reward keyword)")
    prompts.append(prompt)
    for k in first:
      fields[k].append(rest[k])
  return PromptSet(prompts, fields, hashlib.sha256(raw).hexdigest()[:16], path)


def render(prompt: str | list[dict], tok: Tokenizer) -> list[int]:
  """The ids generation continues: chat -> `sft.render_prompt`; plain -> [EOS] + enc(prompt)."""
  if isinstance(prompt, str):
    return [tok.opener_id] + tok.encode(prompt)
  return sft.render_prompt(prompt, tok)


def stop_ids(prompt: str | list[dict], tok: Tokenizer) -> tuple[int, ...]:
  """Where a response ends: EOS after a plain prompt; the turn's <|end|> (or EOS) after a chat prompt."""
  return (tok.eos_id,) if isinstance(prompt, str) else (tok.special_id("<|end|>"), tok.eos_id)


class PromptOrder:
  """Which prompts iteration i takes: consecutive positions of the concatenated epoch permutations."""

  def __init__(self, num_prompts: int, batch_size: int, seed: int):
    if num_prompts < 1 or batch_size < 1:
      raise ValueError(f"PromptOrder: num_prompts={num_prompts} and batch_size={batch_size} must be >= 1")
    self.num_prompts, self.batch_size, self.seed = num_prompts, batch_size, seed

  def permutation(self, epoch: int) -> np.ndarray:
    """int64 [P]: epoch `epoch`'s order of all prompt indices."""
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)

  def batch(self, iteration: int) -> np.ndarray:
    """int64 [B]: the prompt indices of `iteration` (crossing into the next epoch where one ends)."""
    pos_B = iteration * self.batch_size + np.arange(self.batch_size)
    epoch_B, offset_B = np.divmod(pos_B, self.num_prompts)
    out_B = np.empty(self.batch_size, np.int64)
    for e in np.unique(epoch_B):
      at = epoch_B == e
      out_B[at] = self.permutation(int(e))[offset_B[at]]
    return out_B

  def position(self, iteration: int) -> tuple[int, int]:
    """(epoch, offset in its permutation) of the first prompt iteration `iteration` takes."""
    return divmod(iteration * self.batch_size, self.num_prompts)

  def epoch_of(self, iteration: int) -> int:
    """The epoch of the iteration's first prompt."""
    return iteration * self.batch_size // self.num_prompts


def _record(name: str, line: str, where: str) -> tuple[str | list[dict], dict]:
  try:
    rec = json.loads(line)
  except json.JSONDecodeError as e:
    raise ConfigError(key(name, "path"), where, f"invalid JSON ({e.msg})") from None
  if not isinstance(rec, dict):
    raise ConfigError(key(name, "path"), where, f"prompt record is a JSON {type(rec).__name__}, not an object")
  if "prompt" not in rec:
    raise ConfigError(key(name, "path"), where, "prompt record has no 'prompt' field")
  return _prompt(name, rec["prompt"], where), {k: v for k, v in rec.items() if k != "prompt"}


def _prompt(name: str, prompt, where: str) -> str | list[dict]:
  """As `sources._prompt` checks a preference pair's prompt, worded for prompt records."""
  if isinstance(prompt, str):
    return prompt
  if not _messages_ok(prompt):
    raise ConfigError(key(name, "path"), where, "prompt record: 'prompt' must be a string or a list of "
                      f"{{'role': {'|'.join(_ROLES)}, 'content': str}}")
  if not prompt or prompt[-1]["role"] != "user":
    what = f"its last turn is {prompt[-1]['role']}" if prompt else "the list is empty"
    raise ConfigError(key(name, "path"), where, f"prompt record: 'prompt' must end with a user turn ({what})")
  return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _first_fields(name: str, rest: dict, where: str) -> list[str]:
  clash = [k for k in RESERVED_FIELDS if k in rest]
  if clash:
    raise ConfigError(key(name, "path"), where, f"prompt record has a field '{clash[0]}': the reward functions "
                      "receive that keyword themselves")
  return sorted(rest)
