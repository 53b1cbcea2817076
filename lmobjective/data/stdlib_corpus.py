"""Built-in offline corpora drawn from the running Python's standard library.

`python_stdlib`: the .py files (sorted paths; test dirs, site-packages and caches skipped).
`stdlib_prose`: English prose from the same files: each module's docstrings (module, class,
function) joined into one document, plus every `pydoc_data.topics` page.
A module is a file's dotted name under the stdlib root (`json/decoder.py` -> `json.decoder`,
`json/__init__.py` -> `json`); `exclude` drops those modules' files from both corpora.

Parsing 700+ modules for their docstrings takes ~4 s, paid by every tokenizer trained and every
token cache built on `stdlib_prose`. Each file's document is kept by the sha256 of its text: in
this process, and given a cache directory, in `<cache_dir>/stdlib_docstrings-<key>.json` (a hit
needs the same bytes, so a changed file is parsed again whatever the interpreter says).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import warnings

from lmobjective import files
from lmobjective.config import ConfigError
from lmobjective.data.errors import DataWarning

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idle_test", "tests", "test"}


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
  root = stdlib_root()
  files = []
  for d, dirs, names in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("test"))
    files += [os.path.join(d, n) for n in names if n.endswith(".py") and not n.startswith("test_")]
  return sorted(files)


def module_name(path: str) -> str:
  parts = os.path.relpath(path, stdlib_root())[:-len(".py")].split(os.sep)
  return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def module_names() -> list[str]:
  return sorted({module_name(p) for p in stdlib_files()})


def parse_modules(key: str, text: str) -> tuple[str, ...]:
  """The sorted module names of a comma-separated list ("" = none); an unknown name is refused at `key`."""
  names = sorted({n.strip() for n in text.split(",") if n.strip()})
  if not names:
    return ()
  known = set(module_names())
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ConfigError(key, text, f"'{unknown[0]}' is not a module of the stdlib's .py files ({stdlib_root()})")
  return tuple(names)


def fingerprint(exclude: tuple[str, ...] = ()) -> str:
  """Identifies the corpus without reading it: the interpreter version and library location (and
  the excluded modules, only when there are any, so the full corpus keeps its old fingerprint)."""
  base = f"{sys.version}|{stdlib_root()}"
  return f"{base}|exclude={','.join(exclude)}" if exclude else base


def _files(exclude: tuple[str, ...]) -> list[str]:
  drop = set(exclude)
  return [p for p in stdlib_files() if module_name(p) not in drop]


def code_documents(read, exclude: tuple[str, ...] = ()) -> list[str]:
  """One document per non-empty stdlib .py file. `read(path) -> str` decodes (and counts bad bytes)."""
  return [t for t in map(read, _files(exclude)) if t.strip()]


def prose_documents(read, exclude: tuple[str, ...] = (), cache_dir: str | None = None) -> list[str]:
  """Each module's docstrings joined (modules without any left out), then the pydoc topic pages."""
  docs = [d for d in docstring_documents([read(p) for p in _files(exclude)], cache_dir) if d]
  from pydoc_data import topics  # the pages behind `help('topic')`
  docs += [topics.topics[k].strip() for k in sorted(topics.topics) if topics.topics[k].strip()]
  return docs


_DOCSTRINGS: dict[str, str] = {}  # sha256 of a module's text -> its docstring document ("" if none)
_CACHE_FORMAT = 1


def docstring_documents(texts: list[str], cache_dir: str | None = None) -> list[str]:
  """`_module_docstrings` of each text, parsing only the texts neither this process nor the cache file has seen."""
  keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
  path = cache_dir and os.path.join(os.path.expanduser(cache_dir), _cache_name())
  stored = _read_cache(path) if path and any(k not in _DOCSTRINGS for k in keys) else {}
  _DOCSTRINGS.update(stored)
  new = {k: _module_docstrings(t) for k, t in zip(keys, texts) if k not in _DOCSTRINGS}
  _DOCSTRINGS.update(new)
  if path and new:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_json(path, {"format": _CACHE_FORMAT, "documents": {**stored, **{k: _DOCSTRINGS[k] for k in keys}}})
  return [_DOCSTRINGS[k] for k in keys]


def _cache_name() -> str:
  """One file per interpreter, so that caches of several Pythons do not grow one file."""
  return f"stdlib_docstrings-{hashlib.sha256(fingerprint().encode()).hexdigest()[:20]}.json"


def _read_cache(path: str) -> dict[str, str]:
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      data = json.load(f)
    if data["format"] != _CACHE_FORMAT or not all(isinstance(v, str) for v in data["documents"].values()):
      raise ValueError(f"format {data['format']!r}")
    return dict(data["documents"])
  except Exception as e:  # a truncated or foreign file must not stop the run: parse again, rewrite it
    warnings.warn(f"cache {path}: unreadable ({type(e).__name__}); parsing the modules again", DataWarning,
                  stacklevel=2)
    return {}


def _module_docstrings(source: str) -> str:
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):  # a few stdlib files are py2 fixtures or templates
    return ""
  nodes = [tree] + [n for n in ast.walk(tree)
                    if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
  parts = [ast.get_docstring(n) for n in nodes]
  return "\n\n".join(p.strip() for p in parts if p and p.strip())
