"""Learning-rate schedules against closed forms; weight-decay mask on a real parameter tree."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from lmobjective import model as M
from lmobjective import optimizer
from lmobjective.config import load_config_file
from _tiny import ROOT, model_config


def _opt(**kw):
  """configs/default.py's optimizer section with these values, and `kw` on top."""
  base = load_config_file(os.path.join(ROOT, "configs", "default.py")).optimizer
  base.update(dict(learning_rate=1e-3, end_learning_rate=1e-4, schedule="cosine", warmup_steps=10,
                   decay_steps=110, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_embeddings=False,
                   decay_norms_and_biases=False, grad_clip=1.0))
  base.update(kw)
  return base


def test_warmup_then_cosine_closed_form():
  sched = optimizer.learning_rate_schedule(_opt())
  for s in range(10):
    assert abs(float(sched(s)) - 1e-3 * (s + 1) / 10) < 1e-10
  for s in [10, 35, 60, 85, 110]:
    frac = (s - 10) / 100
    want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * frac))
    assert abs(float(sched(s)) - want) < 1e-9, s
  assert float(sched(500)) == pytest.approx(1e-4, rel=1e-6)  # holds the end rate after decay_steps


def test_linear_and_constant_schedules():
  lin = optimizer.learning_rate_schedule(_opt(schedule="linear"))
  assert abs(float(lin(60)) - (1e-3 + 1e-4) / 2) < 1e-9
  const = optimizer.learning_rate_schedule(_opt(schedule="constant"))
  assert float(const(10)) == float(const(1000)) == pytest.approx(1e-3)
  no_warm = optimizer.learning_rate_schedule(_opt(warmup_steps=0))
  assert float(no_warm(0)) == pytest.approx(1e-3)


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_mask_excludes_norms_biases_embeddings(tie):
  cfg = model_config(vocab_size=32, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=16, mlp_dim=32,
                      max_len=8, use_bias=True, norm="layernorm", position="learned", tie_embeddings=tie)
  params = nn.unbox(M.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  mask = optimizer.weight_decay_mask(params)
  flat = {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["block_0/attn/query/kernel"] and flat["block_0/mlp/up/kernel"] and flat["block_0/mlp/down/kernel"]
  assert not flat["block_0/attn/query/bias"] and not flat["block_0/attn_norm/scale"]
  assert not flat["block_0/attn_norm/bias"] and not flat["final_norm/scale"]
  assert not flat["token_embed/embedding"] and not flat["position_embed/embedding"]
  if not tie:
    assert flat["lm_head/kernel"]  # an untied head is a matrix like any other
  all_on = optimizer.weight_decay_mask(params, decay_embeddings=True, decay_norms_and_biases=True)
  assert all(jax.tree.leaves(all_on))


def test_adamw_applies_decay_only_where_masked():
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  tx = optimizer.make_optimizer(_opt(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=0.0))
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, state, params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)  # decoupled decay
  np.testing.assert_allclose(updates["scale"], 0.0)


def test_grad_clip_bounds_the_global_norm():
  params = {"w": jnp.zeros((3,))}
  tx = optimizer.make_optimizer(_opt(schedule="constant", warmup_steps=0, learning_rate=1.0, b1=0.0,
                                     b2=0.0, eps=1e-12, weight_decay=0.0, grad_clip=1.0))
  # clip first, then adam: with b1=b2=0 adam returns sign(g); the clip itself is checked on its own
  clip = optimizer.optax.clip_by_global_norm(1.0)
  g = {"w": jnp.array([3.0, 4.0, 0.0])}
  clipped, _ = clip.update(g, clip.init(params))
  np.testing.assert_allclose(clipped["w"], [0.6, 0.8, 0.0], rtol=1e-6)
  upd, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(upd["w"], [-1.0, -1.0, 0.0], atol=1e-6)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction():
  # decay_steps 100, warmup 10, decay_fraction 0.2: warmup 0-9, the peak 10-79, linear 80-100.
  sched = optimizer.learning_rate_schedule(_opt(schedule="wsd", decay_steps=100, decay_fraction=0.2))
  table = {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3, 50: 1e-3, 79: 1e-3, 80: 1e-3, 85: 7.75e-4, 90: 5.5e-4,
           95: 3.25e-4, 99: 1.45e-4, 100: 1e-4, 300: 1e-4}
  for s, want in table.items():
    assert float(sched(s)) == pytest.approx(want, rel=1e-6, abs=1e-12), s
  muon = optimizer.learning_rate_schedule(_opt(schedule="wsd", decay_steps=100), peak=0.02)
  for s, want in table.items():  # the Muon group: the same shape, scaled by 0.02 / 1e-3
    assert float(muon(s)) == pytest.approx(want * 20, rel=1e-6), s


# ---- Muon -------------------------------------------------------------------------------------

NS_COEFFS, NS_STEPS = (3.4445, -4.775, 2.0315), 5


def _newton_schulz(g, eps=1e-8):
  """optax's orthogonalisation of one [fan_in, fan_out] matrix, in float64: transposed when tall,
  divided by its Frobenius norm + eps, then 5 quintic steps X <- aX + (bA + cA^2)X with A = XX^T."""
  a, b, c = NS_COEFFS
  tall = g.shape[0] > g.shape[1]
  x = g.T if tall else g
  x = x / (np.linalg.norm(x) + eps)
  for _ in range(NS_STEPS):
    A = x @ x.T
    x = a * x + (b * A + c * A @ A) @ x
  return x.T if tall else x


def _muon_reference(params, grads_per_step, lr, wd, beta):
  """Muon's updates in float64: Nesterov momentum with optax's bias correction, Newton-Schulz of
  each layer's [fan_in, fan_out] matrix, scaled by sqrt(max(1, fan_out / fan_in)), plus lr-scaled decay."""
  mu, out = np.zeros_like(params), []
  for t, g in enumerate(grads_per_step, start=1):
    mu = beta * mu + (1 - beta) * g
    nesterov = beta * mu / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
    fan_in, fan_out = nesterov.shape[-2:]
    ortho = np.stack([_newton_schulz(m) for m in nesterov.reshape((-1, fan_in, fan_out))]).reshape(g.shape)
    out.append(-lr * (np.sqrt(max(1.0, fan_out / fan_in)) * ortho + wd * params))
    params = params + out[-1]
  return out


def test_muon_update_equals_a_float64_newton_schulz_and_adamw_keeps_the_rest():
  """Two steps on a wide matrix, a tall one, and a scanned attention out kernel [L, N, H, D] (each
  layer a [N*H, D] matrix); the embedding and the norm scale get AdamW (no decay: the mask)."""
  rng = np.random.default_rng(0)
  shapes = {"up": (3, 8), "down": (8, 3), "out": (2, 2, 3, 5), "embedding": (5, 3), "scale": (3,)}
  axes = {"up": P("embed", "mlp"), "down": P("mlp", "embed"), "out": P("layers", "heads", "head_dim", "embed"),
          "embedding": P("vocab", "embed"), "scale": P("embed")}
  wrap = lambda d: {"up": {"kernel": d["up"]}, "down": {"kernel": d["down"]}, "out": {"kernel": d["out"]},
                    "embed": {"embedding": d["embedding"]}, "norm": {"scale": d["scale"]}}
  params = {k: rng.normal(size=s) for k, s in shapes.items()}
  grads = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(2)]
  lr, wd, beta = 0.05, 0.1, 0.9
  opt = _opt(kind="muon", schedule="constant", warmup_steps=0, learning_rate=1e-2, muon_learning_rate=lr,
             muon_weight_decay=wd, muon_momentum=beta, weight_decay=0.5, grad_clip=0.0)
  tx = optimizer.make_optimizer(opt, param_axes=wrap(axes))
  p32 = wrap({k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
  state, got = tx.init(p32), []
  for g in grads:
    upd, state = tx.update(wrap({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}), state, p32)
    p32 = optax.apply_updates(p32, upd)
    got.append(upd)
  out_flat = lambda x: x.reshape((2, 6, 5))  # [L, N*H, D]: reduction axes (heads, head_dim) first already
  for name, key in [("up", "kernel"), ("down", "kernel"), ("out", "kernel")]:
    ref = _muon_reference(out_flat(params[name]) if name == "out" else params[name],
                          [out_flat(g[name]) if name == "out" else g[name] for g in grads], lr, wd, beta)
    for step_ref, step_got in zip(ref, got):
      np.testing.assert_allclose(np.asarray(step_got[name][key]).reshape(step_ref.shape), step_ref,
                                 atol=1e-5, rtol=0, err_msg=name)
  for name, key in [("embed", "embedding"), ("norm", "scale")]:  # AdamW's first step: -lr * g / (|g| + eps)
    g = grads[0]["embedding" if name == "embed" else "scale"]
    np.testing.assert_allclose(np.asarray(got[0][name][key]), -1e-2 * g / (np.abs(g) + 1e-8), rtol=1e-5)


def _tiny_model(tmp_path, **fields):
  import dataclasses

  from lmobjective import config as config_lib
  from _tiny import tiny_config
  section = config_lib.typed(tiny_config(tmp_path)).model
  return M.Transformer(dataclasses.replace(M.ModelConfig.from_config(section, 512, 32), **fields))


def _flat(tree, is_leaf=None) -> dict:
  return {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


MATRICES = {  # configs/tiny.py: D=64, 2 heads of 32, swiglu F=192; (reduction axes, output axes)
    "attn/query/kernel": ((0,), (1, 2)), "attn/key/kernel": ((0,), (1, 2)), "attn/value/kernel": ((0,), (1, 2)),
    "attn/out/kernel": ((0, 1), (2,)),
    "mlp/gate/kernel": ((0,), (1,)), "mlp/up/kernel": ((0,), (1,)), "mlp/down/kernel": ((0,), (1,))}


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan_layers"])
def test_muon_gets_exactly_the_hidden_matrices(tmp_path, scan):
  from lmobjective import sharding
  model = _tiny_model(tmp_path, scan_layers=scan, tie_embeddings=False, qk_norm=True)
  axes = sharding.logical_axes(model)
  shift = lambda d: tuple(a + 1 for a in d) if scan else d  # the layer axis comes first, as a batch axis
  blocks = ["blocks"] if scan else ["block_0", "block_1"]
  want = {f"{b}/{p}": (shift(r), shift(o)) for b in blocks for p, (r, o) in MATRICES.items()}
  dims = _flat(optimizer.muon_dimension_numbers(axes), is_leaf=optimizer._is_dims)
  assert {p: (d.reduction_axis, d.output_axis) for p, d in dims.items() if d is not None} == want
  adam = {p for p, d in dims.items() if d is None}
  assert adam == {"token_embed/embedding", "lm_head/kernel", "final_norm/scale"} | {
      f"{b}/{n}/scale" for b in blocks for n in ("attn_norm", "mlp_norm", "attn/query_norm", "attn/key_norm")}
  # ... and the state agrees: Muon's momentum holds exactly those, AdamW's moments the rest
  tx = optimizer.make_optimizer(_opt(kind="muon"), 20, axes)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  state = tx.init(params)
  find = lambda cls: [x for x in jax.tree.leaves(state, is_leaf=lambda y: isinstance(y, cls)) if isinstance(x, cls)]
  assert set(_flat(find(optax.contrib.MuonState)[0].mu)) == set(want)
  assert set(_flat(find(optax.ScaleByAdamState)[0].mu)) == adam


def test_muon_needs_a_rule_for_every_kernel():
  with pytest.raises(ValueError, match=r"\['x'\]\['kernel'\]: a kernel with logical axes \('mlp', 'heads'\)"):
    optimizer.muon_dimension_numbers({"x": {"kernel": P("mlp", "heads")}})


# ---- Muon end to end: the command line, kill -9 and resume -------------------------------------


@pytest.mark.slow
def test_muon_cli_learns_and_resumes_after_kill_9_bit_for_bit(tmp_path_factory):
  """`python -m lmobjective.train --config.optimizer.kind=muon` on the fault suite's tiny run (configs/tiny.py,
  a byte tokenizer, 8 steps, a checkpoint every 2): the loss falls; killed at the top of step 6 and
  rerun, every logged loss and the final params equal the uninterrupted run's exactly."""
  import sys
  sys.path.insert(0, os.path.join(ROOT, "tests", "faults"))
  from _faults import STEPS, cli, make_fault_setup
  from lmobjective.analysis import inspection
  from lmobjective.run import checkpoint as ckpt_lib
  from lmobjective.run import metrics_log
  cfg, _ = make_fault_setup(tmp_path_factory)
  d = tmp_path_factory.mktemp("muon")
  lines = lambda w: [{k: v for k, v in r.items() if "loss" in k or k == "step"}
                     for r in metrics_log.read_metrics(str(w)) if "train_loss" in r or "val_loss" in r]
  p = cli(cfg, d / "ref", "optimizer.kind=muon")
  assert p.returncode == 0, p.stderr[-3000:]
  ref = lines(d / "ref")
  train = [r["train_loss"] for r in ref if "train_loss" in r]
  val = [r["val_loss"] for r in ref if "val_loss" in r]
  assert len(train) == STEPS and train[-1] < train[0] - 0.5 and val[-1] < val[0] - 0.5, ref
  p = cli(cfg, d / "killed", "optimizer.kind=muon", faults="step@6=kill")
  assert p.returncode == -9, p.stderr[-3000:]
  assert ckpt_lib.finalized_steps(str(d / "killed")), "killed before any checkpoint: the resume restores nothing"
  p = cli(cfg, d / "killed", "optimizer.kind=muon")
  assert p.returncode == 0, p.stderr[-3000:]
  got = lines(d / "killed")
  assert sorted(got, key=lambda r: (r["step"], "val_loss" in r)) == sorted(ref, key=lambda r: (r["step"], "val_loss" in r))
  for a, b in zip(jax.tree.leaves(inspection.restore(str(d / "killed")).params),
                  jax.tree.leaves(inspection.restore(str(d / "ref")).params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
