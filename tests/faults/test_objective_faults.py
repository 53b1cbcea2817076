"""Faults of the preference objectives that a private fault run found, each handled by the objective:

  * a tied pair (chosen and rejected rows identical after truncation) is left out of every sum: its
    loss is a constant (ln 2) and its gradient rounding noise that Adam would scale into real steps;
    the preference accuracy counts a tie of the log-probs as half;
  * objective.beta outside [1e-4, 1e4] (1/(2β) or σ(β·h) leave float32's range) and
    objective.label_smoothing = 0.5 (a symmetric loss: zero gradient at the reference) are refused in
    one line naming the key, before anything is built;
  * a run that diverges names the objective's settings in its one line.

(The data side of tied pairs, counted per source with a refusal or a warning, is test_stage_faults.py.)
"""

import dataclasses
import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _stages import stage_config  # noqa: E402
from _tiny import model_config  # noqa: E402

from lmobjective import model as M  # noqa: E402
from lmobjective import step, validation  # noqa: E402
from lmobjective.config import ConfigError  # noqa: E402
from lmobjective.objectives import preference  # noqa: E402

CFG = model_config(vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=32, mlp_dim=64, max_len=16)
T = 12
DPO = preference.DPO(beta=0.5, reference="live")


def _pairs(P=4, seed=0):
  """P pairs (rows 2i, 2i+1): a shared 4-token prompt, different responses scored after it."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, (2 * P, T + 1)).astype(np.int32)
  tokens[1::2, :5] = tokens[0::2, :5]
  mask = np.zeros((2 * P, T), bool)
  mask[:, 4:] = True
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:].copy(), "loss_mask": mask,
          "segment_ids": np.ones((2 * P, T), np.int32),
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (2 * P, T)).copy()}


def _step(batch, objective=DPO):
  model, tx = M.Transformer(CFG), optax.sgd(1.0)
  state = step.init_state(model, tx, jax.random.key(0), (2, T))
  reference = step.init_state(model, tx, jax.random.key(1), (2, T)).params
  fn = jax.jit(functools.partial(step.train_step, model=model, tx=tx, objective=objective))
  return fn(state, batch, reference)


def test_a_tied_pair_is_left_out_of_the_loss_and_the_gradient():
  batch = _pairs()
  tied = {k: v.copy() for k, v in batch.items()}
  for k in ("inputs", "targets", "loss_mask"):
    tied[k][1] = tied[k][0]  # pair 0: the rejected row is the chosen one
  dropped = {k: v.copy() for k, v in tied.items()}
  dropped["loss_mask"][:2] = False  # pair 0 as padding: what leaving it out must equal
  (s_tied, m_tied), (s_dropped, m_dropped) = _step(tied), _step(dropped)
  assert int(m_tied["num_pairs"]) == 3
  assert float(m_tied["loss"]) == float(m_dropped["loss"])
  for a, b in zip(jax.tree.leaves(s_tied.params), jax.tree.leaves(s_dropped.params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
  _, m_all = _step(batch)
  assert int(m_all["num_pairs"]) == 4  # untied pairs all count


def test_only_tied_pairs_give_no_pair_and_no_update():
  batch = _pairs(P=2)
  for k in ("inputs", "targets", "loss_mask"):
    batch[k][1::2] = batch[k][0::2]
  state, m = _step(batch)
  assert int(m["num_pairs"]) == 0 and float(m["grad_norm"]) == 0.0
  assert int(m["num_tokens"]) > 0  # tokens were scored, yet nothing was learned: the loop calls it dead


def test_distinct_rows_sees_a_difference_in_any_field():
  batch = _pairs(P=3)
  for k in ("inputs", "targets", "loss_mask"):
    batch[k][1::2] = batch[k][0::2]
  batch["inputs"][3, -1] += 1  # pair 1: one input differs
  batch["loss_mask"][5, -1] = not batch["loss_mask"][5, -1]  # pair 2: one scored target more
  assert np.asarray(preference.distinct_rows(batch)).tolist() == [False, True, True]


def test_preference_accuracy_counts_a_tie_as_half():
  pairs = preference.PairLogps(chosen=jnp.array([-1.0, -2.0, -3.0, -4.0]), rejected=jnp.array([-2.0, -2.0, -1.0, -4.0]),
                               chosen_tokens=jnp.array([1, 2, 3, 2]), rejected_tokens=jnp.array([1, 2, 3, 1]))
  acc = preference.preference_accuracy(pairs, jnp.ones(4, bool))
  assert float(acc.correct_sum) == 1 + 0.5 + 0 + 0.5
  # length-averaged: -1 > -2; -1 == -1 (a tie); -1 < -1/3; -4/2 > -4/1
  assert float(acc.normalized_correct_sum) == 1 + 0.5 + 0 + 1
  assert preference.accuracy_metrics(acc) == {"preference_accuracy": 0.5, "preference_accuracy_normalized": 0.625}


@pytest.fixture()
def dpo_config(tmp_path):
  def make(**overrides):
    return stage_config(tmp_path / "cache", "preference_jsonl", tmp_path / "pairs.jsonl", **{
        "objective.kind": "dpo", "train.init_from": str(tmp_path / "origin"), **overrides})
  return make


@pytest.mark.parametrize("kind", ["dpo", "ipo", "simpo"])
@pytest.mark.parametrize("beta", [1e30, 1e-30, 2e4, 5e-5])
def test_beta_out_of_float32s_range_is_refused(dpo_config, kind, beta):
  with pytest.raises(ConfigError) as e:
    validation.validate(dpo_config(**{"objective.kind": kind, "objective.beta": beta}))
  assert str(e.value) == (f"config.objective.beta={beta!r}: must be in [0.0001, 10000]: beyond it float32 under- or "
                          "overflows (IPO's target 1/(2β), DPO's σ(β·h) saturates) and the run dies")
  for ok in (1e-4, 1e4, 0.1):
    validation.validate(dpo_config(**{"objective.kind": kind, "objective.beta": ok}))


@pytest.mark.parametrize("kind", ["dpo", "simpo"])
def test_symmetric_label_smoothing_is_refused(dpo_config, kind):
  with pytest.raises(ConfigError) as e:
    validation.validate(dpo_config(**{"objective.kind": kind, "objective.label_smoothing": 0.5}))
  assert str(e.value) == ("config.objective.label_smoothing=0.5: must be < 0.5: at 0.5 the loss is symmetric in "
                          "chosen and rejected, and its gradient at the reference is exactly zero")
  validation.validate(dpo_config(**{"objective.kind": kind, "objective.label_smoothing": 0.49}))


def test_label_smoothing_one_half_really_has_no_gradient_at_the_reference():
  """Why 0.5 is refused: the loss's gradient at policy = reference is exactly zero (nothing to learn)."""
  smoothed = dataclasses.replace(DPO, label_smoothing=0.5)
  h = jnp.zeros(())
  grad = jax.grad(lambda x: preference._sigmoid_loss(x, smoothed.label_smoothing))(h)
  assert float(grad) == 0.0 and float(jax.grad(lambda x: preference._sigmoid_loss(x, 0.1))(h)) != 0.0
  assert math.isclose(float(preference._sigmoid_loss(h, 0.5)), math.log(2), rel_tol=1e-6)


def test_a_diverged_run_names_the_objectives_settings():
  from lmobjective.run import train
  hint = train.retry_hint(preference.DPO(beta=0.5, label_smoothing=0.1, rpo_alpha=0.5))
  assert ("objective.kind='dpo', objective.beta=0.5, objective.label_smoothing=0.1, objective.rpo_alpha=0.5, "
          "objective.reference='cached'") in hint
