"""analysis/loglikelihood.py: requests scored as lm-evaluation-harness scores them, checked against a
float64 log-softmax of the model's own logits, and rolling windows that score every token once with the
context the rule states (hand-aligned for a document 3.5 contexts long)."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf"))
from _hf import fixture_dir  # noqa: E402

from lmobjective.analysis import inspection, loglikelihood  # noqa: E402

T = 16


@pytest.fixture(scope="module")
def runs():
  """The Llama fixture (BOS opens a document) scored with a context of 16, and of 64 (the long forward)."""
  return {n: inspection.restore_hf(fixture_dir("llama"), context_length=n) for n in (T, 64)}


def direct_logps(run, rows: list[list[int]]) -> list[np.ndarray]:
  """log p of every next token of each row, [len(row) - 1] float64: the model's logits, log-softmax in NumPy."""
  import jax
  L = max(len(r) for r in rows) - 1
  inputs = np.zeros((len(rows), L), np.int32)
  segments = np.zeros((len(rows), L), np.int32)
  for i, r in enumerate(rows):
    inputs[i, :len(r) - 1], segments[i, :len(r) - 1] = r[:-1], 1
  positions = np.broadcast_to(np.arange(L, dtype=np.int32), inputs.shape)
  logits = np.asarray(jax.device_get(run.model.apply({"params": run.params}, inputs, positions, segments)), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  out = []
  for i, r in enumerate(rows):
    n = len(r) - 1
    out.append(logits[i, np.arange(n), r[1:]] - logz[i, :n])
  return out


def test_rolling_windows_are_the_harness_windows_hand_aligned():
  ids = list(range(100, 156))  # 56 tokens = 3.5 windows of 16
  windows = loglikelihood.rolling_windows(ids, 7, T)
  # (context, continuation): the continuation's own tokens are the rest of each window's 16 inputs
  assert windows == [([7], ids[0:16]), (ids[15:16], ids[16:32]), (ids[31:32], ids[32:48]),
                     (ids[39:48], ids[48:56])]  # the last, short window reaches back to fill 16 inputs
  assert sum(len(c) for _, c in windows) == len(ids)
  assert loglikelihood.rolling_windows(ids[:5], 7, T) == [([7], ids[:5])]
  assert loglikelihood.rolling_windows([], 7, T) == []
  # context_len 4: windows of 13 predictions with 3 more tokens of context
  w4 = loglikelihood.rolling_windows(ids, 7, T, context_len=4)
  assert [len(c) for _, c in w4] == [16, 13, 13, 13, 1] and w4[1] == (ids[12:16], ids[16:29])
  with pytest.raises(ValueError, match="context_len=0"):
    loglikelihood.rolling_windows(ids, 7, T, context_len=0)


def test_each_token_of_a_long_document_is_scored_once_with_the_stated_context(runs):
  run, long = runs[T], runs[64]
  rng = np.random.default_rng(0)
  ids = [int(i) for i in rng.integers(3, 280, 56)]  # 3.5 contexts
  bos = run.tokenizer.opener_id
  assert bos == run.tokenizer.bos_id != run.tokenizer.eos_id  # Llama: BOS opens a document
  scored = loglikelihood.score_text(run, ids)
  assert list(scored.token_ids) == ids  # every token once, in order
  # position p is predicted from: BOS + ids[:p] (p < 16); then ids[15:p], ids[31:p], ids[39:p]
  start = lambda p: None if p < 16 else 15 if p < 32 else 31 if p < 48 else 39
  rows = [([bos] + ids[:p + 1]) if start(p) is None else ids[start(p):p + 1] for p in range(56)]
  want = np.array([lp[-1] for lp in direct_logps(long, rows)])
  np.testing.assert_allclose(scored.token_logprobs, want, atol=2e-5, rtol=0)
  # one forward of the whole document (the 64-token model allows it): the first window is that forward,
  # the later windows are not (they see less), so the check above is not vacuous
  whole = direct_logps(long, [[bos] + ids])[0]
  np.testing.assert_allclose(scored.token_logprobs[:16], whole[:16], atol=2e-5, rtol=0)
  assert np.abs(scored.token_logprobs[16:] - whole[16:]).max() > 1e-3
  assert scored.logprob == pytest.approx(float(scored.token_logprobs.sum()), abs=1e-9)


def test_requests_are_scored_over_the_truncated_row_against_float64(runs):
  run = runs[T]
  rng = np.random.default_rng(1)
  reqs = [([5], [9, 10, 11]), (list(rng.integers(3, 280, 10)), list(rng.integers(3, 280, 4))),
          (list(rng.integers(3, 280, 30)), list(rng.integers(3, 280, 6))),  # 36 > 17: only the last 17 read
          (list(rng.integers(3, 280, 2)), list(rng.integers(3, 280, 16)))]  # a continuation of exactly T
  # a greedy continuation: each token the argmax after the ones before
  ctx = [int(i) for i in rng.integers(3, 280, 5)]
  greedy = []
  for _ in range(4):
    greedy.append(int(np.argmax(direct_logps_next(run, ctx + greedy))))
  reqs.append((ctx, greedy))
  scored = loglikelihood.score(run, reqs, batch_size=4)  # two batches, the second padded
  for (c, x), s in zip(reqs, scored):
    whole = (list(c) + list(x))[-(T + 1):]
    lp = direct_logps(run, [whole])[0][-len(x):]
    np.testing.assert_allclose(s.token_logprobs, lp, atol=2e-5, rtol=0)
    assert s.logprob == pytest.approx(lp.sum(), abs=1e-4)
  assert [s.is_greedy for s in scored] == [False] * 4 + [True]


def direct_logps_next(run, ids: list[int]) -> np.ndarray:
  """log p of every token after `ids` (float64 [V]), from a row of ids + one dummy target."""
  import jax
  inputs = np.asarray([ids], np.int32)
  logits = np.asarray(jax.device_get(run.model.apply({"params": run.params}, inputs,
                                                     np.arange(len(ids), dtype=np.int32)[None],
                                                     np.ones_like(inputs))), np.float64)[0, -1]
  return logits - (np.log(np.exp(logits - logits.max()).sum()) + logits.max())


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_encoding(runs):
  tok = runs[T].tokenizer
  ctx, cont = loglikelihood.encode_pair(tok, "The answer is  ", "forty")
  assert ctx == tok.encode("The answer is")
  assert ctx + cont == tok.encode("The answer is  forty")  # the spaces went with the continuation
  assert loglikelihood.encode_pair(tok, "", "forty") == ([tok.opener_id], tok.encode("forty"))


def test_one_line_refusals(runs):
  run = runs[T]
  with pytest.raises(ValueError, match=r"^request 1: a continuation of 17 tokens is longer than the context length 16$"):
    loglikelihood.score(run, [([1], [2]), ([1], list(range(3, 20)))])
  with pytest.raises(ValueError, match=r"^request 0: empty context"):
    loglikelihood.score(run, [([], [2])])
