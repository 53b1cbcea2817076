"""rewards.py: loading by spec, the weighted NaN-sum (hand table), metrics, and one-line errors."""

import math

import numpy as np
import pytest

from lmobjective import rewards
from lmobjective.config import ConfigError

# Each function returns the column of the table its field holds, so a test writes the table as data.
FUNCTIONS = '''
import numpy as np

def f(prompts, completions, f_col, **_):
  return list(f_col)

def g(prompts, completions, g_col, **_):
  return tuple(g_col)

def as_array(prompts, completions, f_col, **_):
  return np.array([0.0 if v is None else v for v in f_col])

def never(prompts, completions, **_):
  return [None] * len(completions)

def raises(prompts, completions, **_):
  raise ValueError("bad answer\\nsecond line")

def scalar(prompts, completions, **_):
  return 3.0

def text(prompts, completions, **_):
  return "1.0"

def matrix(prompts, completions, **_):
  return np.zeros((len(completions), 2))

def short(prompts, completions, **_):
  return [1.0] * (len(completions) - 1)

NOT_CALLABLE = 3
'''


@pytest.fixture
def rw(tmp_path, monkeypatch):
  """A reward file `rw.py` in the current directory (specs name it by a relative path)."""
  (tmp_path / "rw.py").write_text(FUNCTIONS)
  monkeypatch.chdir(tmp_path)
  return tmp_path


def _batch(f_col, g_col):
  n = len(f_col)
  return [f"p{i}" for i in range(n)], [f"c{i}" for i in range(n)], {"f_col": f_col, "g_col": g_col}


def test_weighted_nan_sum_matches_a_hand_table(rw):
  r = rewards.load("rw.py:f, rw.py:g", "2, -1")
  #           row 0  row 1  row 2  row 3
  f_col = [1.0, None, 3, None]  # an int counts as a number
  g_col = [0.5, 2.0, None, True]  # a bool too
  scored = r(*_batch(f_col, g_col))
  # row 0: 2*1 - 0.5; row 1: g only; row 2: f only; row 3: g only (True = 1)
  np.testing.assert_array_equal(scored.rewards, [1.5, -2.0, 6.0, -1.0])
  np.testing.assert_array_equal(scored.per_function, [[1.0, np.nan, 3.0, np.nan], [0.5, 2.0, np.nan, 1.0]])
  assert scored.rewards.dtype == scored.per_function.dtype == np.float64
  assert scored.names == ("f", "g") and r.entries == ("rw.py:f", "rw.py:g")
  assert rewards.metrics(scored) == {"rewards/f/mean": 2.0, "rewards/f/std": 1.0,  # f: 1, 3
                                     "rewards/g/mean": pytest.approx(7 / 6),  # g: 0.5, 2, 1
                                     "rewards/g/std": pytest.approx(math.sqrt(7 / 18))}


def test_default_weights_are_one_and_a_function_that_never_applies_has_no_metrics(rw):
  r = rewards.load("rw.py:f,rw.py:never", "")
  np.testing.assert_array_equal(r.weights_F, [1.0, 1.0])
  scored = r(*_batch([1.0, -4.0], [None, None]))
  np.testing.assert_array_equal(scored.rewards, [1.0, -4.0])
  assert rewards.metrics(scored) == {"rewards/f/mean": -1.5, "rewards/f/std": 2.5}


def test_array_results_and_module_paths_load(rw):
  r = rewards.load("rw.py:as_array,lmobjective.rewards:exact_answer", "1,10")
  scored = r(["a", "b"], [" 46\n", "47"], {"f_col": [0.25, 0.5], "answer": ["46", "46"]})
  np.testing.assert_array_equal(scored.rewards, [10.25, 0.5])
  assert scored.names == ("as_array", "exact_answer")


def test_colliding_names_are_made_unique(rw):
  assert rewards.load("rw.py:f,rw.py:f,rw.py:f", "").names == ("f", "f_2", "f_3")


def test_absolute_file_path_and_a_module_on_sys_path(rw, monkeypatch):
  (rw / "my_rewards.py").write_text("def length(prompts, completions, **_):\n  return [len(c) for c in completions]\n")
  monkeypatch.syspath_prepend(str(rw))
  r = rewards.load(f"{rw / 'rw.py'}:f,my_rewards:length", "")
  np.testing.assert_array_equal(r(*_batch([1.0, 2.0], [None, None])).rewards, [3.0, 4.0])  # len("c0") = 2


def test_exact_answer_strips_the_completion_only():
  got = rewards.exact_answer(prompts=None, completions=[" 46\n", "46", "47", "4 6", "046"], answer=["46"] * 4 + [46])
  assert got == [1.0, 1.0, 0.0, 0.0, 0.0]


def _load_error(spec, weights=""):
  with pytest.raises(ConfigError) as e:
    rewards.load(spec, weights)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_load_errors_are_one_line_naming_the_key(rw):
  forms = "entries must be 'path/to/file.py:function' or 'package.module:function', comma-separated"
  (rw / "broken.py").write_text("raise RuntimeError('boom\\nmore')\n")
  assert _load_error("") == f"config.rl.reward_fn='': names no reward function ({forms})"
  assert _load_error("rw.py") == f"config.rl.reward_fn='rw.py': 'rw.py' has no ':function' ({forms})"
  assert _load_error("rw.py:f,,rw.py:g") == f"config.rl.reward_fn='rw.py:f,,rw.py:g': entry 2 is empty ({forms})"
  assert _load_error("missing.py:f") == (f"config.rl.reward_fn='missing.py:f': missing.py: no such file "
                                         f"(relative paths start at {rw})")
  assert _load_error("broken.py:f") == ("config.rl.reward_fn='broken.py:f': broken.py failed to import "
                                        "(RuntimeError: boom)")
  assert _load_error("no_such_mod:f") == ("config.rl.reward_fn='no_such_mod:f': no_such_mod failed to import "
                                          "(ModuleNotFoundError: No module named 'no_such_mod')")
  assert _load_error("rw.py:nope") == "config.rl.reward_fn='rw.py:nope': rw.py has no attribute 'nope'"
  assert _load_error("rw.py:NOT_CALLABLE") == ("config.rl.reward_fn='rw.py:NOT_CALLABLE': rw.py:NOT_CALLABLE is not "
                                               "callable (type int)")


def test_weight_errors_are_one_line_naming_the_key(rw):
  assert _load_error("rw.py:f,rw.py:g", "1,x") == ("config.rl.reward_weights='1,x': must be comma-separated numbers "
                                                   "('x' is not a number)")
  assert _load_error("rw.py:f,rw.py:g", "1, inf") == ("config.rl.reward_weights='1, inf': must be finite numbers "
                                                      "(got inf)")
  assert _load_error("rw.py:f", "nan") == "config.rl.reward_weights='nan': must be finite numbers (got nan)"
  assert _load_error("rw.py:f,rw.py:g", "1,2,3") == ("config.rl.reward_weights='1,2,3': has 3 weights for 2 "
                                                     "rewards (rw.py:f, rw.py:g): one per reward, or "
                                                     "\"\" for all 1.0")


def _call_error(spec, f_col=(1.0, 2.0), g_col=(1.0, 2.0)):
  with pytest.raises(rewards.RewardError) as e:
    rewards.load(spec, "")(*_batch(list(f_col), list(g_col)))
  assert "\n" not in str(e.value)
  return str(e.value)


@pytest.mark.parametrize("spec, f_col, message", [
    ("rw.py:raises", (1.0, 2.0), "reward function rw.py:raises raised ValueError: bad answer"),
    ("rw.py:scalar", (1.0, 2.0),
     "reward function rw.py:scalar returned a float, not a sequence (a list with one number or None per completion)"),
    ("rw.py:text", (1.0, 2.0),
     "reward function rw.py:text returned a str, not a sequence (a list with one number or None per completion)"),
    ("rw.py:matrix", (1.0, 2.0),
     "reward function rw.py:matrix returned an array of shape (2, 2), not one value per completion"),
    ("rw.py:short", (1.0, 2.0), "reward function rw.py:short returned 1 values, expected 2 (one per completion)"),
    ("rw.py:f", (1.0, float("nan")),
     "reward function rw.py:f returned nan at row 1 (rewards must be finite; None means not applicable)"),
    ("rw.py:f", (-float("inf"), 1.0),
     "reward function rw.py:f returned -inf at row 0 (rewards must be finite; None means not applicable)"),
    ("rw.py:f", (1.0, "0.5"), "reward function rw.py:f returned a str at row 1 ('0.5'), not a number or None"),
    ("rw.py:f,rw.py:g", (1.0, None),
     "no reward for completion 1: every reward function (rw.py:f, rw.py:g) returned None for it"),
])
def test_call_errors_are_one_line_naming_the_function(rw, spec, f_col, message):
  assert _call_error(spec, f_col, g_col=(1.0, None)) == message


def test_a_batch_of_the_wrong_shape_is_the_callers_error(rw):
  r = rewards.load("rw.py:f", "")
  with pytest.raises(ValueError, match=r"^rewards: 1 prompts for 2 completions \(one prompt per completion\)$"):
    r(["p"], ["a", "b"], {"f_col": [1, 2]})
  with pytest.raises(ValueError, match=r"^rewards: field 'f_col' has 1 values for 2 completions$"):
    r(["p", "q"], ["a", "b"], {"f_col": [1]})


def test_summary_f1_is_squads_word_f1_on_a_hand_table():
  """precision p = common/|completion|, recall q = common/|summary| over word multisets, F1 = 2pq/(p+q)."""
  from lmobjective import rewards
  summary = "Return the number of items in a container."  # 8 words
  table = [("Return the number of items in a container.", 1.0),  # identical
           ("return THE number, of items!", 2 * 5 / (5 + 8)),  # 5 common, case and punctuation ignored
           ("the the the", 2 * 1 / (3 + 8)),  # a repeated word counts as often as the summary has it
           ("Open a file.", 2 * 1 / (3 + 8)),  # "a"
           ("", 0.0), ("xyz", 0.0)]
  got = rewards.summary_f1([None] * len(table), [c for c, _ in table], [summary] * len(table))
  np.testing.assert_allclose(got, [w for _, w in table], rtol=1e-15)
