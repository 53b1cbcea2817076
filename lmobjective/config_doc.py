"""configs/default.py as a page: every leaf key, its default and the comment written beside it.

    python -m lmobjective.config_doc > docs/config.md

The values come from `get_config()`, the comments from the file's own tokens, so the page says what
the file says; `tests/test_config_doc.py` fails when the committed page differs from what this prints.
A key's comment is the one at the end of its line, then the block of comment lines right above it
(no blank line between). The block above a group (`c.mesh = ml_collections.ConfigDict()`, with a
section's `# ---- mesh ----` header) describes the group; a group built by a helper function of the
file (`c.data.sources.code = source(...)`) is described by the helper's docstring, and its keys get
the comments written in the helper.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import re
import tokenize
from typing import Any, Iterator

import ml_collections

from lmobjective import config as config_lib

HEADER = re.compile(r"^-{2,}\s*(.*?)\s*-*$")  # "---- data -----" (after the '#') -> "data"
COMMAND = "python -m lmobjective.config_doc > docs/config.md"


@dataclasses.dataclass(frozen=True)
class Said:
  """What one function of the config file says about what it assigns (paths relative to its root name)."""
  comments: dict[str, str]  # dotted path -> its comment ("" if none)
  lines: dict[str, int]  # dotted path -> the line of its assignment
  helpers: dict[str, str]  # dotted path of a group -> the name of the function that builds it


@dataclasses.dataclass(frozen=True)
class Key:
  """One leaf of the config: `name` dotted from the root, e.g. "data.sources.code.weight"."""
  name: str
  default: Any
  type: type
  comment: str
  order: tuple[int, int]  # (line in get_config, line in the helper that assigns it, or 0): file order


def comment_lines(source: str) -> tuple[dict[int, str], dict[int, str]]:
  """(comments at the end of a line of code, comments alone on their line), by line, without the '#'."""
  trailing, whole = {}, {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      alone = not tok.line[:tok.start[1]].strip()
      (whole if alone else trailing)[tok.start[0]] = tok.string.lstrip("#").strip()
  return trailing, whole


def block_above(line: int, whole: dict[int, str]) -> list[str]:
  """The comment lines right above `line`, top to bottom (stops at a blank line or code)."""
  block = []
  while line - 1 - len(block) in whole:
    block.append(whole[line - 1 - len(block)])
  return block[::-1]


def attribute_path(target: ast.expr) -> str | None:
  """`c.data.context_length` -> "data.context_length"; None for anything but attributes of a name."""
  parts = []
  while isinstance(target, ast.Attribute):
    parts.append(target.attr)
    target = target.value
  return ".".join(reversed(parts)) if parts and isinstance(target, ast.Name) else None


def _called(value: ast.expr) -> str | None:
  """The name a call's function ends in (`ml_collections.ConfigDict()` -> "ConfigDict"), else None."""
  if not isinstance(value, ast.Call):
    return None
  func = value.func
  return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _comment(line: int, trailing: dict[int, str], whole: dict[int, str]) -> str:
  """The comment at the end of the key's line, then (after " — ") the block above it; a header's dashes dropped."""
  block = " ".join(HEADER.match(c).group(1) if HEADER.match(c) else c for c in block_above(line, whole))
  return " — ".join(c for c in (trailing.get(line, ""), block) if c)


def read_function(fn: ast.FunctionDef, trailing, whole, helpers: set[str]) -> Said:
  """`Said` of one function: each attribute it assigns, its comment and line, and the groups helpers build."""
  comments, lines, built = {}, {}, {}
  for node in sorted((n for n in ast.walk(fn) if isinstance(n, ast.Assign)), key=lambda n: n.lineno):
    path = attribute_path(node.targets[0]) if len(node.targets) == 1 else None
    if path is None:
      continue
    comments[path], lines[path] = _comment(node.lineno, trailing, whole), node.lineno
    if _called(node.value) in helpers:
      built[path] = _called(node.value)
  return Said(comments, lines, built)


def read_file(path: str) -> tuple[dict[str, Said], dict[str, str]]:
  """({function name: Said} for every top-level function of the file, {function name: its docstring})."""
  source = open(path, encoding="utf-8").read()
  trailing, whole = comment_lines(source)
  functions = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]
  names = {fn.name for fn in functions}
  said = {fn.name: read_function(fn, trailing, whole, names) for fn in functions}
  return said, {fn.name: ast.get_docstring(fn) or "" for fn in functions}


def leaves(cfg: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any, type]]:
  """(dotted name, value, declared type) of every leaf; a placeholder's type is the one it declares."""
  for name in cfg.keys():
    value = cfg[name]
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves(value, f"{prefix}{name}.")
    else:
      yield f"{prefix}{name}", value, cfg.get_type(name)


def _where(name: str, said: dict[str, Said]) -> tuple[Said, str, int]:
  """(the Said that assigns key `name`, its path there, the line in get_config of the group a helper built)."""
  top = said["get_config"]
  for group, helper in top.helpers.items():
    if name.startswith(group + "."):
      return said[helper], name[len(group) + 1:], top.lines[group]
  return top, name, 0


def keys(path: str = config_lib.DEFAULT_CONFIG) -> list[Key]:
  """Every leaf key of the file's `get_config()`, in the order the file assigns them."""
  said, _ = read_file(path)
  out = []
  for name, value, type_ in leaves(config_lib.load_config_file(path)):
    where, rel, group_line = _where(name, said)
    line = where.lines.get(rel, 10**9)
    order = (group_line, line) if group_line else (line, 0)
    out.append(Key(name, value, type_, where.comments.get(rel, ""), order))
  return sorted(out, key=lambda k: k.order)


def group_notes(path: str = config_lib.DEFAULT_CONFIG) -> dict[str, str]:
  """Dotted path -> what the file says about it: a group's block comment (a section's header), or for a
  group a helper builds, the helper's docstring (`_heading` reads the groups)."""
  said, docs = read_file(path)
  top = said["get_config"]
  notes = {g: c for g, c in top.comments.items() if g not in top.helpers}
  for group, helper in top.helpers.items():
    notes[group] = docs[helper]
    notes.update({f"{group}.{rel}": c for rel, c in said[helper].comments.items()})
  return notes


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def _default(value: Any, type_: type) -> str:
  if value is None:
    return f"`None` ({type_.__name__})"
  return f"`{json.dumps(value)}`" if isinstance(value, str) else f"`{value!r}`"


def _group_of(name: str) -> str:
  return name.rpartition(".")[0]


def grouped(keys_: list[Key]) -> dict[str, list[Key]]:
  """Group (dotted, "" for the top level) -> its leaves, groups in the order the file first assigns into them."""
  groups: dict[str, list[Key]] = {}
  for key in keys_:
    groups.setdefault(_group_of(key.name), []).append(key)
  return groups


def _table(keys_: list[Key]) -> str:
  rows = [f"| `{k.name}` | {_default(k.default, k.type)} | {_cell(k.comment)} |" for k in keys_]
  return "\n".join(["| key | default | comment |", "|---|---|---|", *rows])


def _heading(group: str, notes: dict[str, str]) -> list[str]:
  """A section (`## data`) for a top-level group, a subsection (`### data.tokenizer`) for a nested one."""
  note = notes.get(group, "")
  if "." not in group:
    title = f"`{group}`" if group else "Top level"
    return [f"## {title}" + (f": {_cell(note)}" if note and note != group else "")]
  return [f"### `{group}`"] + ([_cell(note)] if note else [])


def markdown(path: str = config_lib.DEFAULT_CONFIG) -> str:
  """The page: the file's docstring, then a section per top-level key and a table per group of leaves."""
  notes = group_notes(path)
  module_doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read())) or ""
  blocks = ["# Config reference",
            f"Generated from `configs/default.py` by `{COMMAND}`; do not edit it by hand "
            "(`tests/test_config_doc.py` checks it). Set any key with `--config.KEY=VALUE`. The file's docstring:",
            "\n".join(f"> {line}".rstrip() for line in module_doc.splitlines())]
  sections_seen = set()
  for group, keys_ in grouped(keys(path)).items():
    section = group.split(".")[0]
    if section not in sections_seen and section != group:  # a section whose first leaves are nested
      blocks += _heading(section, notes)
    sections_seen.add(section)
    blocks += _heading(group, notes) + [_table(keys_)]
  return "\n\n".join(blocks) + "\n"


if __name__ == "__main__":
  print(markdown(), end="")
