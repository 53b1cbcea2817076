"""The shipped multiple-choice task: pick a standard-library function's docstring summary among four.

Built from the stack's held-out modules (`stdlib_tasks.split(val_fraction)[1]`: functions no stage of
the stack trained on, and which its pretraining left out), so it is on every machine with Python and is
held out from every run of `configs/stack.py`. An item is

    {"id": "bdb.Bdb.canonic", "context": "def canonic(filename):\\n    \\"\\"\\"",
     "continuations": [four summaries], "label": index of the function's own, "target_delimiter": ""}

the function's `def` line as code writes it, then the opening quotes of its docstring; the three other
summaries are other held-out functions' (distinct texts), and the label's position is a seeded hash.
The continuation follows the quotes directly (target_delimiter ""), as a docstring does.
`write(directory)` writes the JSONL and the lm-evaluation-harness task YAML that reads it.
"""

from __future__ import annotations

import json
import os

import numpy as np

from lmobjective import files
from lmobjective.data import stdlib_tasks

TASK_NAME = "lmobjective_docstring_choice"
NUM_CHOICES = 4
HELD_OUT = 0.1  # configs/stack.py's HELD_OUT: the same modules


def items(val_fraction: float = HELD_OUT, num_items: int | None = 200) -> list[dict]:
  """The task's items (a seeded subset of `num_items` held-out functions; None: all of them)."""
  _, val = stdlib_tasks.split(val_fraction)
  order = np.argsort([stdlib_tasks.unit_hash("choice", t.name) for t in val], kind="stable")
  chosen = [val[i] for i in sorted(order[:num_items] if num_items else order)]
  summaries = sorted({t.summary for t in val})
  out = []
  for t in chosen:
    others = [s for s in summaries if s != t.summary]
    pick = np.argsort([stdlib_tasks.unit_hash("distractor", t.name, s) for s in others], kind="stable")
    choices = [others[i] for i in pick[:NUM_CHOICES - 1]]
    label = int(stdlib_tasks.unit_hash("label", t.name) * NUM_CHOICES)
    choices.insert(label, t.summary)
    short = t.signature.split("(", 1)[0].rsplit(".", 1)[-1] + "(" + t.signature.split("(", 1)[1]
    out.append({"id": t.name, "context": f'def {short}:\n    """', "continuations": choices, "label": label,
                "target_delimiter": ""})
  return out


def harness_yaml(jsonl_path: str) -> str:
  """The lm-evaluation-harness task config of the JSONL at `jsonl_path` (an absolute path)."""
  return "\n".join([
      f"task: {TASK_NAME}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
      f"    test: {json.dumps(jsonl_path)}", "test_split: test", "output_type: multiple_choice",
      "doc_to_text: context", "doc_to_choice: continuations", "doc_to_target: label", 'target_delimiter: ""',
      "metric_list:", "  - metric: acc", "  - metric: acc_norm", "  - metric: acc_bytes", ""])


def write(directory: str, val_fraction: float = HELD_OUT, num_items: int | None = 200) -> tuple[str, str]:
  """DIRECTORY/docstring_choice.jsonl and DIRECTORY/docstring_choice.yaml (the harness's task); their paths."""
  os.makedirs(directory, exist_ok=True)
  jsonl = os.path.abspath(os.path.join(directory, "docstring_choice.jsonl"))
  files.atomic_write(jsonl, "".join(json.dumps(i) + "\n" for i in items(val_fraction, num_items)))
  yaml = os.path.join(directory, "docstring_choice.yaml")
  files.atomic_write(yaml, harness_yaml(jsonl))
  return jsonl, yaml
