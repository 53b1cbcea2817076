"""Built-in offline corpora drawn from the running Python's standard library.

`python_stdlib`: the .py files (sorted paths; test dirs, site-packages and caches skipped).
`stdlib_prose`: English prose from the same files: each module's docstrings (module, class,
function) joined into one document, plus every `pydoc_data.topics` page.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig

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


def fingerprint() -> str:
  """Identifies the corpus without reading it: the interpreter version and library location."""
  return f"{sys.version}|{stdlib_root()}"


def code_documents(read) -> list[str]:
  """One document per non-empty stdlib .py file. `read(path) -> str` decodes (and counts bad bytes)."""
  return [t for t in map(read, stdlib_files()) if t.strip()]


def prose_documents(read) -> list[str]:
  docs = [d for d in (_module_docstrings(read(p)) for p in stdlib_files()) if d]
  from pydoc_data import topics  # the pages behind `help('topic')`
  docs += [topics.topics[k].strip() for k in sorted(topics.topics) if topics.topics[k].strip()]
  return docs


def _module_docstrings(source: str) -> str:
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):  # a few stdlib files are py2 fixtures or templates
    return ""
  nodes = [tree] + [n for n in ast.walk(tree)
                    if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
  parts = [ast.get_docstring(n) for n in nodes]
  return "\n\n".join(p.strip() for p in parts if p and p.strip())
