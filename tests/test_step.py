"""train_step: exact gradient accumulation with uneven masks, learning on learnable data."""

import dataclasses
import functools
import math
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmobjective import model as M
from lmobjective import step
from lmobjective.objectives import next_token

NEXT = next_token.NextToken()
from _tiny import model_config

CFG = model_config(vocab_size=64, num_layers=2, num_heads=2, num_kv_heads=2, embed_dim=32, mlp_dim=64, max_len=32)


def _batch(rng, B=8, T=16, V=64, uneven=True):
  tokens = rng.integers(0, V, (B, T + 1)).astype(np.int32)
  mask = np.ones((B, T), bool)
  if uneven:  # rows with very different numbers of scored tokens, one with none
    for b in range(B):
      mask[b, rng.integers(0, T + 1):] = False
    mask[1] = False
  targets = tokens[:, 1:].copy()
  targets[:, -2] = next_token.IGNORE_INDEX  # the -100 convention on top of the mask
  seg = np.ones((B, T), np.int32)
  pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
  return dict(inputs=tokens[:, :-1], targets=targets, loss_mask=mask, segment_ids=seg, positions=pos)


def _adamw_config(**kw):
  """configs/default.py's optimizer section (kind adamw) with these values, and `kw` on top."""
  import os
  from lmobjective.config import load_config_file
  from _tiny import ROOT
  c = load_config_file(os.path.join(ROOT, "configs", "default.py")).optimizer
  c.update(dict(learning_rate=1e-2, end_learning_rate=1e-3, schedule="cosine", warmup_steps=5, decay_steps=150,
                b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, decay_embeddings=False,
                decay_norms_and_biases=False, grad_clip=1.0) | kw)
  return c


def _one_step(tx, k, batch, z_loss=0.0):
  model = M.Transformer(CFG)
  state = step.init_state(model, tx, jax.random.key(0), (2, 16))
  fn = jax.jit(functools.partial(step.train_step, model=model, tx=tx, grad_accum_steps=k,
                                 objective=next_token.NextToken(z_loss=z_loss)))
  return fn(state, batch)


@pytest.mark.parametrize("k", [2, pytest.param(4, marks=pytest.mark.slow), pytest.param(8, marks=pytest.mark.slow)])
def test_grad_accumulation_equals_full_batch(k):
  batch = _batch(np.random.default_rng(k))
  tx = optax.sgd(1.0)  # params move by exactly -grad, so params compare gradients
  full, m_full = _one_step(tx, 1, batch, z_loss=1e-3)
  acc, m_acc = _one_step(tx, k, batch, z_loss=1e-3)
  assert int(m_full["num_tokens"]) == int(m_acc["num_tokens"])
  assert abs(float(m_full["loss"]) - float(m_acc["loss"])) < 1e-6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), full.params, acc.params)
  # and the full-batch gradient is the token-weighted mean, not the mean of per-row means
  model = M.Transformer(CFG)
  init = step.init_state(model, tx, jax.random.key(0), (2, 16))

  def mean_loss(p):
    logits = model.apply({"params": p}, batch["inputs"])
    s, n = next_token.cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return s / n

  g = jax.grad(mean_loss)(init.params)
  expected = jax.tree.map(lambda p, g: p - g, init.params, g)
  # z_loss shifts it slightly, so compare without z-loss
  nz, _ = _one_step(tx, k, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), nz.params, expected)


def _recording_tx():
  """Moves nothing and keeps the gradient it was handed as its state: the accumulated gradient, exactly."""
  init = lambda params: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  update = lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads)
  return optax.GradientTransformation(init, update)


class _BiasModel(nn.Module):
  """logits = a learned bias [V] at every position: each scored token's gradient is softmax(b) - onehot,
  which at b = 0 with V = 2 is exactly (-1/2, +1/2) for target 0: sums of such terms are exact."""
  cfg: Any

  def setup(self):
    self.b_V = self.param("bias", nn.initializers.zeros, (2,), jnp.bfloat16)

  def hidden_states(self, inputs_BxT, positions_BxT=None, segment_ids_BxT=None, deterministic=True):
    return jnp.zeros(inputs_BxT.shape + (1,), jnp.float32)

  def head(self, h_BxTx1):
    return jnp.broadcast_to(self.b_V.astype(jnp.float32), h_BxTx1.shape[:-1] + (2,))

  def __call__(self, inputs_BxT, positions_BxT=None, segment_ids_BxT=None, deterministic=True):
    return self.head(self.hidden_states(inputs_BxT))


def test_bf16_params_accumulate_gradients_in_float32():
  # 16 microbatches: the first scores 512 tokens (gradient sum -256 on b[0]), each of the other 15
  # two tokens (-1). In bf16 the ulp at 256 is 2 and -257 is a tie that rounds to even, back to
  # -256: all 15 vanish. In float32 the sum is -271 and the mean exactly -1/2.
  k, B, T = 16, 32, 256
  batch = _batch(np.random.default_rng(0), B=B, T=T, V=2, uneven=False)
  batch["targets"][:] = 0
  batch["loss_mask"][:] = False
  batch["loss_mask"][0::k] = True  # rows 0 and 16: microbatch 0
  batch["loss_mask"][np.arange(B) % k != 0, 5] = True
  model = _BiasModel(types.SimpleNamespace(dropout=0.0))
  state = step.init_state(model, _recording_tx(), jax.random.key(0), (B // k, T))
  assert state.params["bias"].dtype == jnp.bfloat16
  fn = functools.partial(step.train_step, model=model, tx=_recording_tx(), grad_accum_steps=k, objective=NEXT)
  new, m = jax.jit(fn)(state, batch)
  n = int(m["num_tokens"])
  assert n == 2 * T + (B - 2)

  # reference: the per-microbatch gradients (each exact in bf16), summed in float64
  micros = [jax.tree.map(lambda x: x[j], step._split_groups(batch, k)) for j in range(k)]
  per_micro = [jax.grad(lambda p, mb: NEXT.loss(model, p, mb, None, None, True), has_aux=True)(state.params, mb)[0]
               for mb in micros]
  ref = np.sum([np.float64(g["bias"]) for g in per_micro], axis=0) / n
  np.testing.assert_array_equal(ref, [-0.5, 0.5])
  assert new.opt_state["bias"].dtype == jnp.float32
  np.testing.assert_array_equal(new.opt_state["bias"], ref)
  in_bf16 = functools.reduce(jnp.add, [g["bias"] for g in per_micro])
  np.testing.assert_array_equal(np.float64(in_bf16) / n, [-256 / n, 256 / n])  # what bf16 sums give
  assert new.params["bias"].dtype == jnp.bfloat16  # params keep their dtype


def test_bf16_params_keep_every_state_dtype_across_steps():
  # float32 grads into AdamW would promote its bf16 first moment to float32 on the first update,
  # and the second call would then compile again and mismatch the state's checkpoint layout.
  from lmobjective.optimizer import make_optimizer
  model = M.Transformer(dataclasses.replace(CFG, param_dtype=jnp.bfloat16))
  tx = make_optimizer(_adamw_config())
  state = step.init_state(model, tx, jax.random.key(0), (4, 16))
  dtypes = lambda s: [x.dtype for x in jax.tree.leaves(s)]
  fn = jax.jit(functools.partial(step.train_step, model=model, tx=tx, grad_accum_steps=2, objective=NEXT))
  first = fn(state, _batch(np.random.default_rng(0)))[0]
  second = fn(first, _batch(np.random.default_rng(1)))[0]
  assert dtypes(first.opt_state) == dtypes(second.opt_state) == dtypes(state.opt_state)
  assert jnp.bfloat16 in dtypes(state.opt_state) and dtypes(second.params) == dtypes(state.params)
  assert fn._cache_size() == 1


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_a_skipped_step_keeps_params_and_moments_but_not_the_schedule_behind(kind):
  # nan_policy='skip': the NaN step (index 4) changes nothing but the step; every later step s must
  # use lr(s), as in a clean run, not lr(s - 1).
  from lmobjective import sharding
  from lmobjective.run import experiment
  from lmobjective.optimizer import learning_rate_schedule, make_optimizer
  opt = _adamw_config(warmup_steps=3, decay_steps=10, kind=kind)
  model = M.Transformer(CFG)
  tx = make_optimizer(opt, param_axes=sharding.logical_axes(model))

  def run(bad_step):
    def poisoned(state, batch):
      new, m = step.train_step(state, batch, model=model, tx=tx, grad_accum_steps=2, objective=NEXT)
      return new, {**m, "loss": jnp.where(state.step == bad_step, jnp.nan, m["loss"])}
    fn = jax.jit(functools.partial(experiment._guarded_step, poisoned))
    states, lrs = [step.init_state(model, tx, jax.random.key(0), (4, 16))], []
    for i in range(8):
      state, m = fn(states[-1], _batch(np.random.default_rng(i)))
      assert bool(m["finite"]) == (i != bad_step)
      states.append(state)
      lrs.append(float(m["lr"]))
    return states, lrs

  clean_states, clean = run(bad_step=-1)
  skip_states, skipped = run(bad_step=4)
  schedule = [learning_rate_schedule(opt)(s) for s in range(8)]
  np.testing.assert_allclose(clean, schedule, rtol=1e-6)  # jitted vs eager cosine: an ulp apart
  assert all(clean[s] != clean[s - 1] for s in range(5, 8))  # after the NaN a lag of one would show
  assert skipped == clean
  before, after = skip_states[4], skip_states[5]  # the states the NaN step got and left
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  adam = lambda s: [x for x in jax.tree.leaves(s.opt_state, is_leaf=is_adam) if is_adam(x)][0]
  jax.tree.map(np.testing.assert_array_equal, adam(after), adam(before))  # moments and bias-correction count
  assert int(adam(skip_states[-1]).count) == 7 and int(adam(clean_states[-1]).count) == 8
  assert int(skip_states[-1].step) == 8
  if kind == "muon":  # Muon's momentum and count too; its schedule moves on like AdamW's
    is_muon = lambda x: isinstance(x, optax.contrib.MuonState)
    muon = lambda s: [x for x in jax.tree.leaves(s.opt_state, is_leaf=is_muon) if is_muon(x)][0]
    jax.tree.map(np.testing.assert_array_equal, muon(after), muon(before))
    assert int(muon(skip_states[-1]).count) == 7 and int(muon(clean_states[-1]).count) == 8
    muon_lr = lambda s: [x.hyperparams["learning_rate"] for x in jax.tree.leaves(
        s.opt_state, is_leaf=lambda y: hasattr(y, "hyperparams")) if hasattr(x, "hyperparams")][1]
    assert float(muon_lr(skip_states[-1])) == float(muon_lr(clean_states[-1])) == pytest.approx(
        float(learning_rate_schedule(opt, peak=opt.muon_learning_rate)(7)), rel=1e-6)


def test_all_masked_batch_is_a_zero_update_not_nan():
  batch = _batch(np.random.default_rng(0))
  batch["loss_mask"][:] = False
  state, m = _one_step(optax.sgd(1.0), 2, batch)
  assert int(m["num_tokens"]) == 0 and float(m["loss"]) == 0.0
  assert float(m["grad_norm"]) == 0.0
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_adamw_step_learns_a_deterministic_sequence():
  # A fixed cyclic sequence is perfectly predictable: the loss must fall far below ln V.
  from lmobjective.optimizer import make_optimizer
  tx = make_optimizer(_adamw_config())
  model = M.Transformer(CFG)
  state = step.init_state(model, tx, jax.random.key(0), (8, 16))
  fn = jax.jit(functools.partial(step.train_step, model=model, tx=tx, objective=NEXT))
  cycle = np.arange(17) * 7 % 64
  tokens = np.stack([np.roll(cycle, r) for r in range(8)]).astype(np.int32)
  batch = _batch(np.random.default_rng(0), uneven=False)
  batch.update(inputs=tokens[:, :-1], targets=tokens[:, 1:])
  losses = []
  for _ in range(150):
    state, m = fn(state, batch)
    losses.append(float(m["loss"]))
  assert abs(losses[0] - math.log(64)) < 0.1
  assert losses[-1] < 0.05 * losses[0], losses[-1]
