"""The example notebook runs end to end in a real Jupyter kernel started from this venv's python."""

import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "inspect_run.ipynb")
KERNEL = "lmobjective-test-venv"


def _kernelspec(tmp_path):
  """A kernelspec whose argv is this interpreter, so the kernel is the venv's python, not a global one."""
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "lmobjective (test venv)", "language": "python"}))
  return str(tmp_path / "jupyter")


@pytest.mark.slow
def test_inspect_run_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("JUPYTER_PATH", _kernelspec(tmp_path))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name=KERNEL, allow_errors=False,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on any failing cell
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert f"python: {sys.executable}" in text
  assert "mean -log p" in text and "greedy, cached == uncached" in text
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 3  # loss curves, per-position bars, next-token bars


def _code_cells() -> list[str]:
  nb = nbformat.read(NOTEBOOK, as_version=4)
  return ["\n".join(line for line in c.source.splitlines() if not line.lstrip().startswith("%"))
          for c in nb.cells if c.cell_type == "code"]


def test_every_name_the_notebook_uses_exists():
  """The fast tier's share: without running a kernel, each cell parses, each `from lmobjective...
  import name` resolves, and each attribute read off `run` (what `lmobjective.restore` returns) is
  a field or method of `Run` (a renamed method would otherwise surface only in the slow test)."""
  import ast
  import dataclasses
  import importlib

  from lmobjective.analysis.inspection import Run

  members = set(dir(Run)) | {f.name for f in dataclasses.fields(Run)}
  used = set()
  for source in _code_cells():
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, ast.ImportFrom) and node.module.startswith("lmobjective"):
        module = importlib.import_module(node.module)
        for alias in node.names:
          assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), \
              f"{node.module}.{alias.name}"
      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "run":
        used.add(node.attr)
  assert {"loss_per_position", "generate", "perplexity", "plot_loss_curves"} <= used  # the parse saw the cells
  assert used <= members, sorted(used - members)
