"""The package layout is the architecture: each layer imports only the layers below it.

core (lmobjective/*.py but the doors and the validator) < data < validation (the config boundary:
it checks the data keys too) < run < analysis < sweep. The doors, `python -m lmobjective.<verb>`,
sit above every layer: `lmobjective/train.py` (the training CLI) is the one module that joins run and
analysis, and the others are a docstring and an import of the `cli` they open (tests/test_commands.py
keeps them that thin). Read from the source (lazy imports inside functions included), so a shortcut
upward fails here.
"""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lmobjective")
RANK = {"core": 0, "data": 1, "validation": 2, "run": 3, "analysis": 4, "sweep": 5}
DOORS = ("lmobjective.train", "lmobjective.evaluate", "lmobjective.diagnose", "lmobjective.mixture_regression")


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
      if rel in DOORS or rel == "lmobjective.__init__":
        continue  # the doors open commands of any layer; __init__ lazily exposes restore
      own = RANK[_layer(rel)]
      for imported in _imports(path):
        if RANK[_layer(imported)] > own:
          bad.append(f"{rel} imports {imported}")
  assert not bad, bad


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
  """Made to fail on purpose: a core module that imports from run/ is reported, and so is a
  would-be door that DOORS does not name; a named door is not."""
  fake = tmp_path / "lmobjective"
  (fake / "run").mkdir(parents=True)
  (fake / "model.py").write_text("from lmobjective.run import experiment\n")
  (fake / "evaluate.py").write_text("from lmobjective.analysis.evaluate import cli\n")
  (fake / "generate.py").write_text("from lmobjective.analysis.generate import cli\n")
  monkeypatch.setattr(__import__(__name__), "ROOT", str(fake))
  try:
    test_every_layer_imports_only_layers_below_it()
  except AssertionError as e:
    assert "lmobjective.model imports lmobjective.run" in str(e)
    assert "lmobjective.generate imports lmobjective.analysis.generate" in str(e)
    assert "lmobjective.evaluate" not in str(e)
  else:
    raise AssertionError("the upward import was not caught")
