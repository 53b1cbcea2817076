"""analysis/choice.py and the shipped task (data/stdlib_choice.py): the harness's multiple-choice metrics on
hand-made numbers, requests scored by the one rule, one-line refusals of a bad task file."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf"))
from _hf import fixture_dir  # noqa: E402

from lmobjective.analysis import choice, inspection, loglikelihood  # noqa: E402
from lmobjective.data import stdlib_choice, stdlib_tasks  # noqa: E402


def test_acc_acc_norm_and_acc_bytes_by_hand():
  # lls chosen so the three argmaxes differ: raw -> 0, per character -> 1, per byte -> 2
  items = [{"context": "c", "continuations": ["ab", "abcdefghij", "ééééé"], "label": 1}]  # 2, 10, 5 chars; 2, 10, 10 bytes
  lls = [-2.0, -5.0, -3.0]  # per char: -1, -0.5, -0.6; per byte: -1, -0.5, -0.3
  m = choice.metrics(items, lls)
  assert m == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 0.0, "num_items": 1}
  m = choice.metrics(items * 2, lls + [-9.0, -1.0, -9.0])
  assert m["acc"] == 0.5 and m["acc_norm"] == 1.0 and m["acc_bytes"] == 0.5
  assert choice.requests([{"context": "Q:", "continuations": ["a", "b"], "label": 0}]) == [("Q:", " a"), ("Q:", " b")]
  assert choice.requests([{"context": "Q:", "continuations": ["a"], "target_delimiter": "", "label": 0}]) == [("Q:", "a")]


def test_evaluate_scores_each_request_by_the_one_rule():
  run = inspection.restore_hf(fixture_dir("gpt2"), context_length=32)
  items = [{"context": "The capital of France is ", "continuations": ["Paris", "Rome", "a cat"], "label": 0},
           {"context": "", "continuations": ["yes", "no"], "label": 1}]  # an empty context: the prefix token
  m = choice.evaluate(run, items)
  pairs = [loglikelihood.encode_pair(run.tokenizer, c, x) for c, x in choice.requests(items)]
  assert pairs[3][0] == [run.tokenizer.opener_id]
  want = [s.logprob for s in loglikelihood.score(run, pairs)]
  assert m["lls"] == want and m == {**choice.metrics(items, want), "lls": want}


@pytest.mark.parametrize("line, message", [
    ('{"context": "q", "label": 0}', r"needs 'continuations', a list of at least two non-empty strings"),
    ('{"context": "q", "continuations": ["a", "b"], "label": 2}', r"'label' 2 is not an index into its 2 continuations"),
    ('{"context": "q", "continuations": ["a", "b"], "label": true}', r"'label' True is not an index"),
    ('{"continuations": ["a", "b"], "label": 0}', r"needs a string 'context'"),
    ('[1]', r"an item is a JSON object"),
])
def test_a_bad_task_line_is_refused_in_one_line(tmp_path, line, message):
  path = tmp_path / "task.jsonl"
  path.write_text('{"context": "q", "continuations": ["a", "b"], "label": 1}\n' + line + "\n")
  with pytest.raises(ValueError, match=f"^--choice_task={path}:2: " + message):
    choice.read_task(str(path))


def test_the_shipped_task_is_held_out_and_well_formed(tmp_path):
  items = stdlib_choice.items()
  assert len(items) == 200 and items == stdlib_choice.items()  # a pure function of the running Python
  held = set(stdlib_tasks.heldout_modules(stdlib_choice.HELD_OUT))
  by_name = {t.name: t for t in stdlib_tasks.split(stdlib_choice.HELD_OUT)[1]}
  labels = np.bincount([it["label"] for it in items], minlength=4)
  assert labels.min() > 30  # the right answer is not always in one place
  for it in items:
    t = by_name[it["id"]]
    assert t.module in held and it["continuations"][it["label"]] == t.summary
    assert len(set(it["continuations"])) == 4 and it["context"].startswith("def ") and it["context"].endswith('"""')
  jsonl, yaml = stdlib_choice.write(str(tmp_path), num_items=10)
  assert choice.read_task(jsonl) == stdlib_choice.items(num_items=10)
  assert f"task: {stdlib_choice.TASK_NAME}" in open(yaml).read() and json.dumps(jsonl) in open(yaml).read()
