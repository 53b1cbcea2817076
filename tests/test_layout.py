"""The package layout is the architecture: each layer imports only the layers below it.

core (lmobjective/*.py but the CLI and the validator) < data < validation (the config boundary:
it checks the data keys too) < run < analysis < sweep; `lmobjective/train.py` (the training CLI)
is the one module that joins run and analysis. Read from the source (lazy imports
inside functions included), so a shortcut upward fails here.
"""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lmobjective")
RANK = {"core": 0, "data": 1, "validation": 2, "run": 3, "analysis": 4, "sweep": 5}


def _layer(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[1] in RANK else "core"


def _imports(path: str):
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmobjective"):
      if node.module == "lmobjective":  # from lmobjective import x: x is a core module or a package
        yield from (f"lmobjective.{a.name}" for a in node.names)
      else:
        yield node.module
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("lmobjective"))


def test_every_layer_imports_only_layers_below_it():
  bad = []
  for dirpath, _, names in os.walk(ROOT):
    for name in names:
      if not name.endswith(".py"):
        continue
      path = os.path.join(dirpath, name)
      rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
      if rel in ("lmobjective.train", "lmobjective.__init__"):
        continue  # the CLI joins run and analysis; __init__ lazily exposes restore
      own = RANK[_layer(rel)]
      for imported in _imports(path):
        if RANK[_layer(imported)] > own:
          bad.append(f"{rel} imports {imported}")
  assert not bad, bad


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
  """Made to fail on purpose: a core module that imports from run/ is reported."""
  fake = tmp_path / "lmobjective"
  (fake / "run").mkdir(parents=True)
  (fake / "model.py").write_text("from lmobjective.run import experiment\n")
  monkeypatch.setattr(__import__(__name__), "ROOT", str(fake))
  try:
    test_every_layer_imports_only_layers_below_it()
  except AssertionError as e:
    assert "lmobjective.model imports lmobjective.run" in str(e)
  else:
    raise AssertionError("the upward import was not caught")
