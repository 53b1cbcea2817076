"""The preference train and eval steps: pairs kept whole under accumulation, exact sums, the frozen
reference, and the loss of a real model checked against float64 NumPy on its own logits."""

import dataclasses
import functools
import math

import jax
import numpy as np
import optax
import pytest

from lmobjective import model as M
from lmobjective import step
from lmobjective.objectives import preference
from _tiny import model_config

CFG = model_config(vocab_size=64, num_layers=2, num_heads=2, num_kv_heads=2, embed_dim=32, mlp_dim=64, max_len=32)
T, V = 16, 64


def _pairs(rng, P=8):
  """P pairs as 2P interleaved rows: a shared prompt of random length, responses after it."""
  rows = 2 * P
  tokens = rng.integers(0, V, (rows, T + 1)).astype(np.int32)
  mask = np.zeros((rows, T), bool)
  for p in range(P):
    prompt = rng.integers(2, 8)
    tokens[2 * p + 1, :prompt + 1] = tokens[2 * p, :prompt + 1]  # the rejected row shares the prompt
    for r, end in ((2 * p, rng.integers(prompt + 1, T + 1)), (2 * p + 1, rng.integers(prompt + 1, T + 1))):
      mask[r, prompt:end] = True  # targets prompt+1 .. end: the response tokens
  seg = np.ones((rows, T), np.int32)
  pos = np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy()
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:].copy(), loss_mask=mask, segment_ids=seg, positions=pos)


def _state(tx, seed=0):
  return step.init_state(M.Transformer(CFG), tx, jax.random.key(seed), (2, T))


DPO = preference.DPO(beta=0.5, label_smoothing=0.1, reference="live")
RPO = preference.DPO(beta=0.5, rpo_alpha=1.0, reference="live")  # DPO + the chosen NLL per token


def _for(loss, batch):
  """`loss` reading its reference from the batch when the batch carries one (objective.reference=cached)."""
  return dataclasses.replace(loss, reference="cached") if "reference_logps" in batch else loss


def _train(loss, k, batch, reference, tx=optax.sgd(1.0), seed=0):
  fn = jax.jit(functools.partial(step.train_step, model=M.Transformer(CFG), tx=tx, objective=_for(loss, batch),
                                 grad_accum_steps=k))
  return fn(_state(tx, seed), batch, reference)


def _eval(loss, params, batch, *reference):
  return jax.jit(functools.partial(step.eval_step, model=M.Transformer(CFG), objective=_for(loss, batch)))(
      params, batch, *reference)


@pytest.mark.parametrize("k,loss", [(2, DPO), pytest.param(4, DPO, marks=pytest.mark.slow), pytest.param(4, RPO, marks=pytest.mark.slow)],
                         ids=["dpo-2", "dpo-4", "rpo-4"])
def test_accumulation_keeps_pairs_whole_and_equals_the_full_batch(k, loss):
  batch, reference = _pairs(np.random.default_rng(k)), _state(optax.sgd(1.0), seed=1).params
  full, m_full = _train(loss, 1, batch, reference)
  acc, m_acc = _train(loss, k, batch, reference)
  assert int(m_acc["num_pairs"]) == int(m_full["num_pairs"]) == 8
  for key in preference.PreferenceSums._fields:
    np.testing.assert_allclose(float(m_acc[key]), float(m_full[key]), rtol=2e-6, atol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), full.params, acc.params)
  halves = jax.tree.map(lambda x: x[0], step._split_groups(batch, k, 2))
  np.testing.assert_array_equal(halves["inputs"][:2], batch["inputs"][:2])  # pair 0 whole, in order
  np.testing.assert_array_equal(halves["inputs"][2:4], batch["inputs"][2 * k:2 * k + 2])  # then pair k


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
  tx = optax.sgd(1.0)
  batch = _pairs(np.random.default_rng(0))
  _, m = _train(preference.DPO(beta=0.1, reference="live"), 1, batch, _state(tx).params)
  assert abs(float(m["loss"]) - math.log(2)) < 1e-6
  for key in ("chosen_reward_sum", "rejected_reward_sum", "margin_sum", "accuracy_sum"):
    assert abs(float(m[key])) < 1e-6, key
  assert float(m["grad_norm"]) > 0  # DPO's gradient at policy = reference is not zero


def _logps_float64(params, batch):
  """Summed response log-probs per row, from the model's logits through a float64 log-softmax."""
  logits = np.asarray(M.Transformer(CFG).apply({"params": params}, batch["inputs"], batch["positions"],
                                                batch["segment_ids"]), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
  return (picked * batch["loss_mask"]).sum(-1), batch["loss_mask"].sum(-1)


def test_dpo_step_equals_float64_numpy_on_the_models_logits():
  tx = optax.sgd(1.0)
  batch = _pairs(np.random.default_rng(3))
  policy, reference = _state(tx, seed=0).params, _state(tx, seed=1).params
  pol, _ = _logps_float64(policy, batch)
  ref, _ = _logps_float64(reference, batch)
  h = (pol[0::2] - ref[0::2]) - (pol[1::2] - ref[1::2])
  z, eps = DPO.beta * h, DPO.label_smoothing
  expected = np.mean(-(1 - eps) * np.log(1 / (1 + np.exp(-z))) - eps * np.log(1 / (1 + np.exp(z))))
  _, m = _train(DPO, 2, batch, reference)
  assert abs(float(m["loss"]) - expected) < 1e-6
  assert abs(float(m["margin_sum"]) - DPO.beta * h.sum()) < 1e-5
  assert abs(float(m["chosen_logp_sum"]) - pol[0::2].sum()) < 1e-4


def test_prompt_targets_change_neither_loss_nor_gradient():
  tx = optax.sgd(1.0)
  batch = _pairs(np.random.default_rng(5))
  other = dict(batch, targets=np.where(batch["loss_mask"], batch["targets"], (batch["targets"] + 7) % V))
  assert (other["targets"] != batch["targets"]).any()
  reference = _state(tx, seed=1).params
  a, ma = _train(DPO, 1, batch, reference)
  b, mb = _train(DPO, 1, other, reference)
  assert float(ma["loss"]) == float(mb["loss"])
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a.params, b.params)


def test_padding_pairs_count_for_nothing():
  tx = optax.sgd(1.0)
  batch = _pairs(np.random.default_rng(6))
  padded = {k: v.copy() for k, v in batch.items()}
  padded["loss_mask"][4:6] = False  # pair 2 is padding (no scored token in either row)
  reference = _state(tx, seed=1).params
  _, m = _train(DPO, 1, padded, reference)
  keep = np.r_[0:4, 6:16]
  _, m_dropped = _train(DPO, 1, {k: v[keep] for k, v in batch.items()}, reference)
  assert int(m["num_pairs"]) == 7
  assert abs(float(m["loss"]) - float(m_dropped["loss"])) < 1e-6


def test_eval_step_accuracy_is_reference_free_and_counts_pairs():
  tx = optax.sgd(1.0)
  batch = _pairs(np.random.default_rng(7))
  policy = _state(tx).params
  pol, n = _logps_float64(policy, batch)
  model = M.Transformer(CFG)
  simpo = preference.SimPO(beta=2.0, simpo_gamma=0.5)
  pref, acc = jax.jit(functools.partial(step.eval_step, model=model, objective=simpo))(policy, batch)
  assert int(acc.num_pairs) == 8
  assert int(acc.correct_sum) == int((pol[0::2] > pol[1::2]).sum())
  mean = pol / n
  assert int(acc.normalized_correct_sum) == int((mean[0::2] > mean[1::2]).sum())
  z = 2.0 * (mean[0::2] - mean[1::2]) - 0.5
  assert abs(float(pref.loss_sum) - np.sum(np.log1p(np.exp(-z)))) < 1e-5


def test_chunked_loss_gives_the_dense_step():
  batch, reference = _pairs(np.random.default_rng(8)), _state(optax.sgd(1.0), seed=1).params
  tx = optax.sgd(1.0)
  run = lambda chunk: jax.jit(functools.partial(step.train_step, model=M.Transformer(CFG), tx=tx,
                                                objective=dataclasses.replace(DPO, loss_chunk_size=chunk)))(
      _state(tx), batch, reference)
  (dense, m_dense), (chunked, m_chunked) = run(0), run(4)
  assert abs(float(m_dense["loss"]) - float(m_chunked["loss"])) < 1e-6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), dense.params, chunked.params)


@pytest.mark.parametrize("loss", [DPO, pytest.param(preference.IPO(beta=0.5, reference="live"), marks=pytest.mark.slow)])
def test_a_batchs_reference_logps_stand_in_for_the_reference_forward(loss):
  """A cached reference (the batch's values, as `run/reference_cache.py` makes them) gives the live step;
  IPO also reads the reference's lengths, which come from the policy's rows."""
  tx = optax.sgd(1.0)
  batch, reference = _pairs(np.random.default_rng(9)), _state(tx, seed=1).params
  ref_logp, _ = _logps_float64(reference, batch)
  cached = dict(batch, reference_logps=ref_logp.astype(np.float32))
  (live, m_live), (from_batch, m_batch) = _train(loss, 2, batch, reference), _train(loss, 2, cached, None)
  for key in preference.PreferenceSums._fields:
    np.testing.assert_allclose(float(m_batch[key]), float(m_live[key]), rtol=1e-5, atol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), live.params, from_batch.params)
  pref, _ = _eval(loss, _state(tx).params, cached)
  np.testing.assert_allclose(float(pref.loss_sum), float(_eval(loss, _state(tx).params, batch, reference)[0].loss_sum),
                             rtol=1e-5)
