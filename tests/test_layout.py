"""The package layout is the architecture: each layer imports only the layers below it.

core (lmobjective/*.py but the doors and the validator) < data < hf (Hugging Face checkpoints and
tokenizers) < validation (the config boundary:
it checks the data keys too) < run < analysis < sweep. The doors, `python -m lmobjective.<verb>`,
sit above every layer (and so does `lmobjective.harness`, the lm-evaluation-harness adapter's name):
`lmobjective/train.py` (the training CLI) is the one module that joins run and
analysis, and the others are a docstring and an import of the `cli` they open (tests/test_commands.py
keeps them that thin). Read from the source (lazy imports inside functions included), so a shortcut
upward fails here.
"""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lmobjective")
RANK = {"core": 0, "data": 1, "hf": 2, "validation": 3, "run": 4, "analysis": 5, "sweep": 6}
DOORS = ("lmobjective.train", "lmobjective.evaluate", "lmobjective.diagnose", "lmobjective.mixture_regression",
         "lmobjective.export", "lmobjective.harness")


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


# ---- the objective is decided in one place ---------------------------------------------------------
# Outside lmobjective/objectives/, no code asks which objective runs (a kind compared or looked up)
# or guesses it from the metrics an objective logs: it asks the objective (`exp.objective`).
KIND_TESTS = (
    r"objective\.kind\s*(==|!=|\bin\b|\bnot in\b)",  # config.objective.kind == "dpo", ... in (...)
    r"\bkind\s*(==|!=)\s*[\"'](next_token|dpo|ipo|simpo)[\"']",
    r"[\"'](num_pairs|correct_sum|rewards/margins|val_rewards/margins|rewards/accuracies)[\"']\s+(not\s+)?in\b",
    r"REFERENCE_LOSSES|PreferenceLoss|preference_train_step",
)


def _kind_tests(root: str) -> list[str]:
  import re
  found = []
  for dirpath, _, names in os.walk(root):
    if os.path.relpath(dirpath, root).split(os.sep)[0] == "objectives":
      continue
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        for i, line in enumerate(open(path), 1):
          if any(re.search(p, line) for p in KIND_TESTS):
            found.append(f"{os.path.relpath(path, root)}:{i}: {line.strip()}")
  return found


def test_only_objectives_test_the_objective_kind():
  assert _kind_tests(ROOT) == []


def test_the_kind_check_catches_a_branch_on_the_kind(tmp_path):
  """Made to fail on purpose: the tests this codebase had before the objective interface are reported."""
  (tmp_path / "objectives").mkdir()
  (tmp_path / "objectives" / "preference.py").write_text('if o.kind == "dpo":\n  pass\n')  # allowed there
  (tmp_path / "train.py").write_text('if "num_pairs" in last:\n  pass\n')
  (tmp_path / "post_run.py").write_text('  if exp.config.objective.kind != "next_token":\n')
  assert sorted(f.split(":")[0] for f in _kind_tests(str(tmp_path))) == ["post_run.py", "train.py"]


def _module_imports(path: str):
  """Like `_imports`, but `from package import module` names the module (the edge a circle runs along)."""
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmobjective"):
      yield from (f"{node.module}.{a.name}" for a in node.names)
      yield node.module
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("lmobjective"))


def _import_graph(root: str) -> dict[str, set[str]]:
  """module -> the lmobjective modules it imports (names that are no module, e.g. functions, dropped)."""
  graph = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".").removesuffix(".__init__")
        graph[rel] = set(_module_imports(path))
  for rel, imported in graph.items():
    graph[rel] = {m for m in imported if m in graph and m != rel}
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Import circles between modules (a package's own submodules importing it do not count)."""
  found, state = [], {}

  def visit(node, path):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if nxt not in graph or node.startswith(nxt + "."):
        continue
      if state.get(nxt) == "open":
        found.append(path[path.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  return found


def test_no_import_circle():
  assert _cycles(_import_graph(ROOT)) == []


def test_the_circle_check_catches_a_circle(tmp_path):
  """Made to fail on purpose: evaluate <-> inspection, as it was before `analysis/pairs.py`."""
  pkg = tmp_path / "lmobjective" / "analysis"
  pkg.mkdir(parents=True)
  (pkg / "evaluate.py").write_text("from lmobjective.analysis import inspection\n")
  (pkg / "inspection.py").write_text("def f():\n  from lmobjective.analysis import evaluate\n")
  assert _cycles(_import_graph(str(tmp_path / "lmobjective"))) == [
      ["lmobjective.analysis.evaluate", "lmobjective.analysis.inspection", "lmobjective.analysis.evaluate"]]
