"""Sharding on 8 simulated CPU devices: same losses and parameters on every mesh, parameters and
optimizer state really sharded, a checkpoint saved under FSDP restores on one device.

The main pytest process has already started JAX with one device, so the 8-device checks run in a
subprocess (`python tests/test_sharding.py <workdir>`) that prints one JSON line.
"""

import json
import os
import sys

import numpy as np
import pytest
from _tiny import run_on_8_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
STEPS = 3


def tiny_config(cache_dir: str):
  from lmobjective.config import load_config_file

  c = load_config_file(os.path.join(ROOT, "configs/tiny.py"))
  c.data.cache_dir = cache_dir
  c.model.num_heads = 8  # tiny has 2 heads; tensor=8 needs the head axis divisible by 8
  c.eval.num_batches = 1
  return c


def _local_shape(x):
  return list(x.addressable_shards[0].data.shape)


def _run_mesh(config, mesh_shape, workdir, batches):
  import jax

  from lmobjective.run import experiment

  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
  exp = experiment.build(config, workdir, devices=jax.devices()[: int(np.prod(mesh_shape))])
  state = exp.init_fn(jax.random.key(config.seed))
  losses = []
  for b in batches:
    state, metrics = exp.train_fn(state, experiment.device_batch(exp, b))
    losses.append(float(metrics["loss"]))
  return exp, state, losses


def worker(workdir: str, break_mesh: bool = False) -> dict:
  import jax

  from lmobjective.run import checkpoint as ckpt_lib
  from lmobjective.run import experiment
  from lmobjective import sharding

  assert jax.device_count() == 8
  config = tiny_config(os.path.join(workdir, "cache"))
  exp0 = experiment.build(config, workdir, devices=jax.devices()[:1])
  it = exp0.pipeline.train_iterator()
  batches = [next(it) for _ in range(STEPS)]
  eval_batch = exp0.eval_sets["code"][0]
  out = {"losses": {}, "params": {}, "shards": {}}
  for mesh_shape in MESHES:
    exp, state, losses = _run_mesh(config, mesh_shape, workdir, batches)
    if break_mesh and mesh_shape == (2, 4, 1):  # deliberate bug: this mesh sees different data
      exp, state, losses = _run_mesh(config, mesh_shape, workdir, batches[::-1])
    key = "x".join(map(str, mesh_shape))
    out["losses"][key] = losses
    out["params"][key] = [np.asarray(x).ravel()[:64].tolist() for x in jax.tree.leaves(state.params)]
    p, mu = state.params, state.opt_state
    mu_embed = [x for x in jax.tree.leaves(mu) if x.shape == p["token_embed"]["embedding"].shape][0]
    out["shards"][key] = {
        "embedding": _local_shape(p["token_embed"]["embedding"]),
        "embedding_mu": _local_shape(mu_embed),
        "mlp_up": _local_shape(p["block_0"]["mlp"]["up"]["kernel"]),
        "query": _local_shape(p["block_0"]["attn"]["query"]["kernel"]),
        "devices": len(p["block_0"]["mlp"]["up"]["kernel"].sharding.device_set),
    }
    if mesh_shape == (2, 4, 1):  # FSDP: save here (the run's own checkpoint code), restore below on one device
      mngr = ckpt_lib.make_manager(os.path.join(workdir, "fsdp_run"))
      ckpt_lib.save(mngr, state, {}, config)
      mngr.wait_until_finished()
      out["eval_saved"] = float(exp.eval_fn(state.params, experiment.device_batch(exp, eval_batch)).loss_sum)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  one = experiment.build(config, workdir, devices=jax.devices()[:1])
  shape = one.init_fn.eval_shape(jax.random.key(0))
  target = sharding.abstract_state(shape, one.state_sharding)
  mngr = ckpt_lib.make_manager(os.path.join(workdir, "fsdp_run"), read_only=True)
  restored, _, _ = ckpt_lib.restore_latest(mngr, os.path.join(workdir, "fsdp_run"), target)
  out["restored_devices"] = len(restored.params["token_embed"]["embedding"].sharding.device_set)
  out["eval_restored"] = float(one.eval_fn(restored.params, experiment.device_batch(one, eval_batch)).loss_sum)
  out["num_tokens"] = int(one.eval_fn(restored.params, experiment.device_batch(one, eval_batch)).num_tokens)
  return out


MUON_MESHES = [(1, 1, 1), (2, 2, 2), (1, 4, 2)]


def muon_worker(workdir: str) -> dict:
  """optimizer.kind=muon: every optimizer-state leaf that mirrors a parameter (Muon's momentum,
  AdamW's moments) has that parameter's sharding, and the losses agree across meshes."""
  import jax
  import optax

  from lmobjective.run import experiment

  config = tiny_config(os.path.join(workdir, "cache"))
  config.optimizer.kind = "muon"
  it = experiment.build(config, workdir, devices=jax.devices()[:1]).pipeline.train_iterator()
  batches = [next(it) for _ in range(STEPS)]
  flat = lambda t: {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  has_mu = lambda x: isinstance(x, (optax.contrib.MuonState, optax.ScaleByAdamState))
  out = {"losses": {}, "mismatched": {}, "muon_leaves": {}, "mu_up": {}}
  for mesh_shape in MUON_MESHES:
    _, state, losses = _run_mesh(config, mesh_shape, workdir, batches)
    key = "x".join(map(str, mesh_shape))
    params = flat(state.params)
    moments = [x for x in jax.tree.leaves(state.opt_state, is_leaf=has_mu) if has_mu(x)]
    muon = [m for m in moments if isinstance(m, optax.contrib.MuonState)][0]
    out["losses"][key] = losses
    out["mismatched"][key] = [path for m in moments for path, x in flat(m.mu).items()
                              if x.sharding != params[path].sharding]
    out["muon_leaves"][key] = len(flat(muon.mu))
    out["mu_up"][key] = _local_shape(muon.mu["block_0"]["mlp"]["up"]["kernel"])
  return out


def run_worker(tmp_path, *extra) -> dict:
  return run_on_8_devices(__file__, tmp_path, *extra, timeout=600)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  return run_worker(tmp_path_factory.mktemp("sharding"))


@pytest.mark.slow
def test_same_losses_and_params_on_every_mesh(result):
  ref = result["losses"]["1x1x1"]
  assert len(ref) == STEPS and ref[0] > ref[-1] - 1.0
  for key, losses in result["losses"].items():
    np.testing.assert_allclose(losses, ref, atol=1e-5, rtol=0, err_msg=key)
    for a, b in zip(result["params"][key], result["params"]["1x1x1"]):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.slow
def test_params_and_optimizer_state_are_really_sharded(result):
  s = result["shards"]
  # tiny: V=512, D=64, 8 heads x 8, F=192. embedding [V,D] -> (vocab: tensor, embed: fsdp)
  assert s["1x1x1"] == {"embedding": [512, 64], "embedding_mu": [512, 64], "mlp_up": [64, 192],
                        "query": [64, 8, 8], "devices": 1}
  assert s["8x1x1"]["embedding"] == [512, 64] and s["8x1x1"]["devices"] == 8  # pure DP: replicated
  assert s["2x4x1"]["embedding"] == s["2x4x1"]["embedding_mu"] == [512, 16]  # FSDP over 4
  assert s["2x4x1"]["mlp_up"] == [16, 192]
  assert s["2x2x2"]["embedding"] == [256, 32] and s["2x2x2"]["mlp_up"] == [32, 96]
  assert s["2x2x2"]["query"] == [32, 4, 8]
  assert s["1x1x8"]["embedding"] == [64, 64] and s["1x1x8"]["query"] == [64, 1, 8]


@pytest.mark.slow
def test_checkpoint_saved_under_fsdp_restores_on_one_device(result):
  assert result["restored_devices"] == 1 and result["num_tokens"] > 0
  np.testing.assert_allclose(result["eval_restored"], result["eval_saved"], rtol=1e-6)


@pytest.mark.slow
def test_muon_state_is_sharded_like_the_params(result):
  r = result["muon"]
  for key in r["losses"]:
    assert r["mismatched"][key] == [], key
    assert r["muon_leaves"][key] == 2 * 7  # 2 layers x (q, k, v, out, gate, up, down)
    np.testing.assert_allclose(r["losses"][key], r["losses"]["1x1x1"], atol=1e-5, rtol=0, err_msg=key)
  # mlp up [D=64, F=192] -> (embed: fsdp, mlp: tensor)
  assert r["mu_up"] == {"1x1x1": [64, 192], "2x2x2": [32, 96], "1x4x2": [16, 96]}


if __name__ == "__main__":  # both workers in one process: one JAX start-up, one tokenizer and token cache
  out = worker(sys.argv[1], break_mesh="--break" in sys.argv[2:])
  print(json.dumps({**out, "muon": muon_worker(sys.argv[1])}))


# Each parameter's mesh axes, read by hand from sharding.RULES (embed -> fsdp; vocab, heads, kv_heads,
# mlp -> tensor; head_dim, layers -> not split) and the logical names model.py gives each kernel.
SPLIT = {
    "attn/query/kernel": ("fsdp", "tensor", None), "attn/key/kernel": ("fsdp", "tensor", None),
    "attn/value/kernel": ("fsdp", "tensor", None), "attn/out/kernel": ("tensor", None, "fsdp"),
    "mlp/gate/kernel": ("fsdp", "tensor"), "mlp/up/kernel": ("fsdp", "tensor"), "mlp/down/kernel": ("tensor", "fsdp"),
    "attn_norm/scale": ("fsdp",), "mlp_norm/scale": ("fsdp",), "final_norm/scale": ("fsdp",),
    "token_embed/embedding": ("tensor", "fsdp"),
}


def test_each_parameter_is_split_over_the_mesh_axes_its_logical_names_map_to():
  """The fast tier's share, in this process: the declared layout of the tiny model's every parameter."""
  import jax

  from lmobjective import config as config_lib
  from lmobjective import sharding
  from lmobjective.model import ModelConfig, Transformer
  from _tiny import tiny_config as tiny

  model = Transformer(ModelConfig.from_config(config_lib.typed(tiny("/unused")).model, 64, 8))
  specs = sharding.param_shardings(model, sharding.single_device_mesh(), (1, 8))
  got = {"/".join(k.key for k in path if not k.key.startswith("block_")): tuple(s.spec)
         for path, s in jax.tree_util.tree_flatten_with_path(specs)[0]}
  assert got == SPLIT
