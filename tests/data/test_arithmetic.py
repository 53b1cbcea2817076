"""arithmetic.py: a deterministic addition task with a leak-free split, written as the files each stage reads."""

import json

import numpy as np
import pytest

from conftest import file_config
from lmobjective.data import arithmetic, prompts, sources

ALL_1_DIGIT = {(a, b) for a in range(10) for b in range(10)}


def _unordered(pairs):
  return {tuple(sorted(p)) for p in pairs}


def test_problems_are_a_pure_function_of_the_arguments():
  train, heldout = arithmetic.problems(2, seed=7, num_train=300, num_heldout=50)
  assert (train, heldout) == arithmetic.problems(2, seed=7, num_train=300, num_heldout=50)
  assert (train, heldout) != arithmetic.problems(2, seed=8, num_train=300, num_heldout=50)
  assert len(train) == 300 == len(set(train)) and len(heldout) == 50 == len(set(heldout))
  assert all(0 <= a < 100 and 0 <= b < 100 for a, b in train + heldout)


def test_split_is_disjoint_even_for_swapped_operands_across_seeds_and_digits():
  pools = [arithmetic.problems(d, seed=s, num_train=2000, num_heldout=100) for d in (2, 3) for s in (0, 1)]
  all_train = _unordered(p for train, _ in pools for p in train)
  all_heldout = _unordered(p for _, heldout in pools for p in heldout)
  assert len(all_heldout) > 300  # the pools overlap little: the check below is not vacuous
  assert not all_train & all_heldout  # no (a, b) and no (b, a) in both, under any of these arguments
  assert all(arithmetic.is_heldout(a, b) == arithmetic.is_heldout(b, a) for a, b in all_heldout | all_train)


def test_heldout_share_of_the_pair_space():
  n_held = sum(arithmetic.is_heldout(a, b) for a in range(100) for b in range(100))
  assert abs(n_held - arithmetic.HELDOUT_SHARE * 10**4) < 100  # ~1000, binomial-ish sd ~30 (swaps pair up)


def test_a_small_space_is_used_whole_and_an_impossible_request_refused():
  n_held = sum(arithmetic.is_heldout(a, b) for a, b in ALL_1_DIGIT)
  train, heldout = arithmetic.problems(1, seed=3, num_train=100 - n_held, num_heldout=n_held)
  assert set(train) | set(heldout) == ALL_1_DIGIT
  with pytest.raises(ValueError) as e:
    arithmetic.problems(1, seed=3, num_train=50, num_heldout=n_held + 1)
  assert str(e.value) == (f"1-digit addition has {100 - n_held} train and {n_held} held-out pairs: "
                          f"num_train=50, num_heldout={n_held + 1} ask for more")


def test_draws_from_a_large_space_skip_repeats():
  train, heldout = arithmetic.problems(4, seed=0, num_train=30000, num_heldout=300)  # ~4.5 repeats expected
  assert len(set(train)) == 30000 and len(set(heldout)) == 300


def test_large_operands_are_drawn_uniformly():
  train, heldout = arithmetic.problems(12, seed=0, num_train=4000, num_heldout=10)
  a = np.array([p[0] for p in train], np.float64)
  assert len(set(train)) == 4000 and a.max() < 10**12
  sd_of_mean = 10**12 / np.sqrt(12 * 4000)
  assert abs(a.mean() - (10**12 - 1) / 2) < 5 * sd_of_mean
  assert len(str(int(a.max()))) == 12


@pytest.mark.parametrize("kwargs, message", [
    ({"num_digits": 0}, "num_digits=0: must be in [1, 18]"),
    ({"seed": -1}, "seed=-1: must be >= 0"),
    ({"num_train": -1}, "num_train=-1, num_heldout=200: must be >= 0"),
    ({"num_digits": 4, "num_heldout": 5_000_001}, "num_train=20000, num_heldout=5000001: more than half of a split "
     "of 4-digit addition (100000000 pairs, 10% held out)"),
])
def test_bad_arguments_are_refused_in_one_line(kwargs, message):
  with pytest.raises(ValueError) as e:
    arithmetic.problems(**{"num_digits": 2, "seed": 0, **kwargs})
  assert str(e.value) == message


def test_records():
  assert arithmetic.pretrain_record(12, 34) == {"text": "12+34=46"}
  assert arithmetic.sft_record(12, 34) == {"messages": [{"role": "user", "content": "12+34="},
                                                        {"role": "assistant", "content": "46"}]}
  assert arithmetic.prompt_record(99, 1) == {"prompt": [{"role": "user", "content": "99+1="}], "answer": "100"}


def test_written_files_are_read_by_their_source_kinds(tmp_path):
  paths = arithmetic.write_task(str(tmp_path / "task"), num_digits=2, num_train=200, num_heldout=30, seed=5)
  assert sorted(paths) == ["pretrain", "prompts_heldout", "prompts_train", "sft"]
  train, heldout = arithmetic.problems(2, seed=5, num_train=200, num_heldout=30)
  text = sources.load_source("f", file_config("jsonl", paths["pretrain"], val_fraction=0.0).data.sources.f)
  assert text.train == [f"{a}+{b}={a + b}" for a, b in train]
  chat = sources.load_source("f", file_config("chat_jsonl", paths["sft"], val_fraction=0.0).data.sources.f)
  assert chat.train == [arithmetic.sft_record(a, b)["messages"] for a, b in train]
  held = prompts.load_prompts("h", paths["prompts_heldout"])
  assert held.prompts == [[{"role": "user", "content": f"{a}+{b}="}] for a, b in heldout]
  assert held.fields == {"answer": [str(a + b) for a, b in heldout]}
  assert len(prompts.load_prompts("t", paths["prompts_train"])) == 200
  seen = {t.split("=")[0] for t in text.train}
  assert not seen & {f"{a}+{b}" for a, b in heldout}  # no held-out problem reaches pretraining
  with open(paths["prompts_train"]) as f:
    assert json.loads(f.readline()) == arithmetic.prompt_record(*train[0])


def test_heldout_prompts_score_by_exact_answer(tmp_path):
  from lmobjective import rewards
  paths = arithmetic.write_task(str(tmp_path), num_digits=3, num_train=10, num_heldout=4, seed=0)
  held = prompts.load_prompts("h", paths["prompts_heldout"])
  batch_prompts, fields = held.take([0, 1, 2, 3])
  completions = [f" {fields['answer'][0]}", fields["answer"][1], "0", fields["answer"][3] + "0"]
  scored = rewards.load("lmobjective.rewards:exact_answer", "")(batch_prompts, completions, fields)
  np.testing.assert_array_equal(scored.rewards, [1.0, 1.0, 0.0, 0.0])
