"""A 262,144-token vocabulary with the chunked loss, end to end: training and every post-run step
(loss by position, `evaluate --source`, `restore().loss_per_position`, generation) finish, and no
compiled program among them holds [B,T,V] logits: each one's scratch memory is within the chunked
bound, far below one dense float32 logits buffer.

The model's vocabulary (262,144) is far larger than the tokenizer's (512), which the build allows:
every program computes all 262,144 logits, and the head gives the rows past the tokenizer's -inf
(`ModelConfig.vocab_limit`), so training, scoring and sampling normalise over the same 512 ids.
"""

import jax
import numpy as np
import pytest

from lmobjective import hlo, restore, sharding
from lmobjective.analysis import evaluate, position_loss, post_run
from lmobjective.run import experiment, train
from _tiny import tiny_config

V, C = 262_144, 4  # vocabulary, loss chunk (positions)
B, T = 8, 32  # the tiny preset's batch and context
DENSE = B * T * V * 4  # one float32 [B,T,V] logits buffer: 268 MB
CHUNK = B * C * V * 4  # one chunk's logits: 34 MB
TEXT = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def large_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("large_vocab")
  config = tiny_config(tmp / "cache", **{
      "model.vocab_size": V, "objective.loss_chunk_size": C, "train.steps": 2, "eval.every_steps": 2,
      "checkpoint.every_steps": 2, "model.num_layers": 1})
  last = train.run(config, str(tmp / "run"), post_run=post_run.STEPS)
  return config, tmp / "run", last


def _temp(program) -> list[int]:
  return [hlo.memory(e)["temp"] for e in program.executables]


def _within_chunked_bound(temps, label, param_bytes=0):
  """A chunk's logits, its softmax and their gradient (4 chunk buffers), plus, for a train step,
  four parameter-sized buffers (the gradient, two new Adam moments, the update): the [V,D] table
  is most of the model here."""
  assert temps, f"{label}: no program compiled"
  bound = 4 * CHUNK + 4 * param_bytes
  for t in temps:
    assert t <= bound, f"{label}: {t:,} bytes of scratch > the chunked bound {bound:,}; dense logits = {DENSE:,}"


@pytest.fixture(scope="module")
def restored(large_run):
  return restore(str(large_run[1]))


@pytest.mark.slow
def test_training_and_post_run_work_finish(large_run):
  config, workdir, last = large_run
  # 2 steps from a near-uniform guess over the 512 live ids (ln 262,144 = 12.5 if the padding took mass)
  assert np.log(512) - 0.5 < last["val_loss"] < np.log(512) + 0.05
  positions = position_loss.load(str(workdir))
  assert positions is not None and sum(positions["count"]) > 0


@pytest.mark.slow
def test_the_chunked_loss_equals_a_dense_float64_softmax_on_a_slice(restored):
  """`loss_per_position` (the chunked program, C positions at a time) against -log softmax over
  the 262,144 logits in float64 NumPy, the rows past the tokenizer's 512 at -inf, from the same
  hidden states and the tied embedding table."""
  run = restored
  ids = run.tokenizer.encode(TEXT)
  assert len(ids) <= run.context_length  # one window: the opener, then the text
  inputs, targets = np.asarray([[run.tokenizer.opener_id] + ids[:-1]], np.int32), np.asarray([ids], np.int32)
  positions, mask = np.arange(len(ids), dtype=np.int32)[None], np.ones((1, len(ids)), bool)
  h_TxD = np.asarray(run.model.apply({"params": run.params}, inputs, positions, mask.astype(np.int32),
                                     method="hidden_states")[0], np.float64)
  table_VxD = np.asarray(run.params["token_embed"]["embedding"], np.float64)  # tiny preset: tied embeddings
  logits_TxV = h_TxD @ table_VxD.T
  logits_TxV[:, run.tokenizer.vocab_size:] = -np.inf
  peak = logits_TxV.max(axis=-1)
  log_z = peak + np.log(np.exp(logits_TxV - peak[:, None]).sum(axis=-1))
  n = int(mask[0].sum())
  want = (log_z - logits_TxV[np.arange(len(log_z)), targets[0]])[:n]
  got = run.loss_per_position(TEXT).nll
  assert len(got) == n > 5
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.slow
def test_train_eval_and_position_programs_stay_within_the_chunked_bound(large_run):
  config, workdir, _ = large_run
  exp = experiment.build(config, str(workdir))
  state = sharding.abstract_state(exp.init_fn.eval_shape(jax.random.key(0)), exp.state_sharding)
  batch = experiment.device_batch(exp, next(exp.pipeline.train_iterator()))
  exp.train_fn.compile(state, batch)
  exp.eval_fn.compile(state.params, batch)
  pos = position_loss._sums_fn(exp)
  pos.compile(state.params, batch)
  param_bytes = 4 * sum(x.size for x in jax.tree.leaves(state.params))
  _within_chunked_bound(_temp(exp.train_fn), "train step", param_bytes)
  for label, program in (("eval step", exp.eval_fn), ("loss by position", pos)):
    _within_chunked_bound(_temp(program), label)


@pytest.mark.slow
def test_notebook_evaluate_and_generation_stay_within_the_chunked_bound(restored):
  run = restored
  assert run.model.cfg.vocab_size == V
  per_token = run.loss_per_position(TEXT)
  assert np.all(np.isfinite(per_token.nll)) and len(per_token.nll) > 5
  m = evaluate.evaluate_source(run, "code", num_batches=1)
  assert np.isfinite(m["loss"])
  # sampling from a near-uniform model over 262,144 ids: without the head's -inf past the tokenizer's
  # 512 ids nearly every draw would be an id the tokenizer cannot decode
  ids = run.generate_ids("def ", max_new_tokens=16, temperature=1.0)
  assert 1 <= len(ids) <= 16 and all(0 <= i < run.tokenizer.vocab_size for i in ids)
  assert isinstance(run.generate(TEXT, max_new_tokens=8), str)
  top = run.next_token_distribution(TEXT, top_k=20)
  assert len(top) == 20 and all(i < run.tokenizer.vocab_size for _, i, _ in top)
  for label, program in (("loss_per_position", run.row_losses), ("evaluate --source", run.eval_program),
                         ("generation", run._samplers[True].program),
                         ("next token", run._samplers[True].first_program)):
    _within_chunked_bound(_temp(program), label)


def test_the_bound_catches_dense_logits(tmp_path):
  """Made to fail on purpose: the same steps with chunking off hold [B,T,V] and break the bound.
  Compiled only (abstract state), nothing trained: the fast tier's share of this file."""
  dense = tiny_config(tmp_path / "cache", **{"model.vocab_size": V, "objective.loss_chunk_size": 0,
                                             "model.num_layers": 1})
  exp = experiment.build(dense, str(tmp_path / "run"))
  state = sharding.abstract_state(exp.init_fn.eval_shape(jax.random.key(0)), exp.state_sharding)
  batch = experiment.device_batch(exp, next(exp.pipeline.train_iterator()))
  exp.eval_fn.compile(state.params, batch)
  exp.train_fn.compile(state, batch)
  param_bytes = 4 * sum(x.size for x in jax.tree.leaves(state.params))
  assert _temp(exp.eval_fn)[0] >= DENSE and _temp(exp.train_fn)[0] >= 2 * DENSE
  with pytest.raises(AssertionError):
    _within_chunked_bound(_temp(exp.eval_fn), "dense eval step")
  with pytest.raises(AssertionError):
    _within_chunked_bound(_temp(exp.train_fn), "dense train step", param_bytes)
