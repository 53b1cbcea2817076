"""lmobjective.harness through lm-evaluation-harness itself, where it is installed (`pytest -m lmeval`;
pip install -e '.[eval]'): the harness's own request encoding and windows, loglikelihood against a
float64 computation, acc_norm by the harness's own task code, and simple_evaluate of the shipped task
equal to the built-in runner."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf"))
from _hf import fixture_dir  # noqa: E402

pytestmark = pytest.mark.lmeval
lm_eval = pytest.importorskip("lm_eval")

from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

import lmobjective.harness  # noqa: E402
from lmobjective.analysis import choice, inspection, loglikelihood  # noqa: E402
from lmobjective.data import stdlib_choice  # noqa: E402
from test_loglikelihood import direct_logps  # noqa: E402


@pytest.fixture(scope="module")
def lm():
  return lmobjective.harness.LM(run=inspection.restore_hf(fixture_dir("gpt2"), context_length=32))


def _requests(kind, args_list):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args_list)]


def test_our_encode_pair_is_the_harness_split(lm):
  for ctx, cont in [("Question: 2 + 2 =", " 4"), ("Answer:  ", "yes"), ("x \t ", " y"), ("no space", "tail"),
                    ("", "starts a document")]:
    theirs = lm._encode_pair(ctx, cont) if ctx else None
    ours = loglikelihood.encode_pair(lm.run.tokenizer, ctx, cont)
    if ctx:
      assert ours == tuple(theirs)
    else:
      assert ours == ([lm.prefix_token_id], lm.tok_encode(cont))


def test_rolling_windows_are_the_harness_functions():
  for n, T, ctx_len in [(1, 16, 1), (16, 16, 1), (17, 16, 1), (56, 16, 1), (57, 16, 4), (100, 7, 3)]:
    ids = list(range(10, 10 + n))
    theirs = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(ids, 3, T, ctx_len)]
    assert loglikelihood.rolling_windows(ids, 3, T, ctx_len) == theirs


def test_loglikelihood_is_the_summed_logprob_and_greedy_is_an_argmax_check(lm):
  reqs = [("The capital of France is", " Paris"), ("", "hello"), ("a b c d e f g h i j k l m n o p q r s t u v w x", " y z")]
  out = lm.loglikelihood(_requests("loglikelihood", reqs))
  for (ctx, cont), (ll, greedy) in zip(reqs, out):
    c, x = lm._encode_pair(ctx, cont) if ctx else ([lm.prefix_token_id], lm.tok_encode(cont))
    row = (c + x)[-(lm.max_length + 1):]
    lp = direct_logps(lm.run, [row])[0][-len(x):]
    assert ll == pytest.approx(lp.sum(), abs=1e-4)
    logits_argmax = [int(np.argmax(_next_logps(lm.run, row[:len(row) - len(x) + k]))) for k in range(len(x))]
    assert greedy == (logits_argmax == list(x))
  # a continuation that is the greedy one
  ctx_ids = lm.tok_encode("def f(x):")
  greedy_ids = []
  for _ in range(3):
    greedy_ids.append(int(np.argmax(_next_logps(lm.run, ctx_ids + greedy_ids))))
  (_, is_greedy), = lm._loglikelihood_tokens([(("", ""), ctx_ids, greedy_ids)])
  assert is_greedy


def _next_logps(run, ids):
  from test_loglikelihood import direct_logps_next
  return direct_logps_next(run, ids)


def test_loglikelihood_rolling_is_the_per_document_sum(lm):
  texts = ["word " * 40, "short one"]
  out = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
  assert out == pytest.approx([loglikelihood.score_text(lm.run, lm.tok_encode(t)).logprob for t in texts], rel=1e-6)


def test_acc_norm_is_the_harness_task_code_on_the_same_numbers(tmp_path):
  directory = lmobjective.harness.write_tasks(str(tmp_path))
  task = TaskManager(include_path=directory).load(stdlib_choice.TASK_NAME)["tasks"][stdlib_choice.TASK_NAME]
  items = choice.read_task(os.path.join(directory, "docstring_choice.jsonl"))[:20]
  rng = np.random.default_rng(0)
  lls = list(-rng.uniform(5, 60, 4 * len(items)))
  ours = choice.metrics(items, lls)
  theirs = [task.process_results(it, [(lls[4 * i + j], False) for j in range(4)]) for i, it in enumerate(items)]
  for name in ("acc", "acc_norm", "acc_bytes"):
    assert ours[name] == pytest.approx(np.mean([t[name] for t in theirs]))
  assert ours["acc"] != ours["acc_norm"]  # the numbers tell the two apart


def test_simple_evaluate_of_the_shipped_task_equals_the_built_in_runner(tmp_path):
  lm128 = lmobjective.harness.LM(run=inspection.restore_hf(fixture_dir("gpt2"), context_length=128))
  # the fixture's 288-piece tokenizer spells a summary in up to 166 tokens: the items whose answers fit 128
  items = [it for it in stdlib_choice.items() if max(len(lm128.tok_encode(c)) for c in it["continuations"]) < 100][:24]
  jsonl = tmp_path / "docstring_choice.jsonl"
  jsonl.write_text("".join(json.dumps(it) + "\n" for it in items))
  (tmp_path / "docstring_choice.yaml").write_text(stdlib_choice.harness_yaml(str(jsonl)))
  out = lm_eval.simple_evaluate(model=lm128, tasks=[stdlib_choice.TASK_NAME],
                                task_manager=TaskManager(include_path=str(tmp_path)))
  theirs = out["results"][stdlib_choice.TASK_NAME]
  ours = choice.evaluate(lm128.run, choice.read_task(str(jsonl)))
  assert ours["num_items"] == 24
  for name in ("acc", "acc_norm", "acc_bytes"):
    assert theirs[f"{name},none"] == pytest.approx(ours[name])


def test_generate_until_is_the_greedy_sampler_cut_at_the_stop_string(lm):
  ctx = "def add(a, b):"
  free = lm.generate_until(_requests("generate_until", [(ctx, {"max_gen_toks": 12})]))[0]
  ids = lm.run.sample_ids([lm.tok_encode(ctx)], (lm.eot_token_id,), 12, 0.0)
  new = [int(t) for t in ids.tokens[0][ids.response_mask[0]] if t != lm.eot_token_id]
  assert free == lm.tok_decode(new)
  stop = free[3:5]
  cut = lm.generate_until(_requests("generate_until", [(ctx, {"max_gen_toks": 12, "until": [stop]})]))[0]
  assert cut == free[:free.index(stop)] and len(cut) < len(free)
