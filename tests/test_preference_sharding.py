"""A DPO stage on 8 simulated CPU devices: the same losses and params on every mesh, and in the
compiled train step the frozen reference (`objective.reference="live"`) is an argument laid out
exactly like the policy's params (sharded under FSDP/tensor parallelism, never donated), which
`memory_analysis()` shows; a cached reference scored on a 2x2x2 mesh gives the live losses.

One subprocess (`python tests/test_preference_sharding.py <workdir>`) trains a tiny origin on one
device, then builds the DPO stage from it on each mesh and prints one JSON line.
"""

import json
import os
import sys

import numpy as np
import pytest

from _tiny import run_on_8_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]
STEPS = 2


def _pairs_file(path: str, n: int = 96) -> None:
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    for _ in range(n):
      w = "".join(rng.choice(list("abcdefgh"), rng.integers(3, 8)))
      f.write(json.dumps({"prompt": f"reverse {w}", "chosen": w[::-1], "rejected": w}) + "\n")


def worker(workdir: str) -> dict:
  import jax

  sys.path.insert(0, os.path.join(ROOT, "tests"))
  sys.path.insert(0, os.path.join(ROOT, "tests", "faults"))
  from _faults import write_text
  from _stages import stage_config
  import pathlib

  from lmobjective import hlo, sharding
  from lmobjective.run import experiment, train

  assert jax.device_count() == 8
  cache, common = os.path.join(workdir, "cache"), {"model.num_heads": 8, "data.tokenizer.kind": "byte",
                                                    "data.context_length": 24}
  text = write_text(pathlib.Path(workdir) / "corpus.txt")
  origin = stage_config(cache, "text", text, **common, **{"train.steps": 2, "eval.num_batches": 0})
  train.run(origin, os.path.join(workdir, "origin"))  # on all 8 devices, data-parallel
  _pairs_file(os.path.join(workdir, "pairs.jsonl"))
  out = {"losses": {}, "params": {}, "layout": {}, "cached_losses": {}}
  dpo = lambda reference: stage_config(cache, "preference_jsonl", os.path.join(workdir, "pairs.jsonl"), **common, **{
      "objective.kind": "dpo", "train.init_from": os.path.join(workdir, "origin"), "train.batch_size": 16,
      "train.grad_accum_steps": 2, "eval.num_batches": 0, "objective.reference": reference})
  for mesh in MESHES:
    c = dpo("live")  # what this test looks at: the reference as an argument of the compiled step
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    exp = experiment.build(c, os.path.join(workdir, "stage"), devices=jax.devices()[: int(np.prod(mesh))])
    state = exp.init_fn(jax.random.key(0))
    it = exp.pipeline.train_iterator()
    batch = experiment.device_batch(exp, next(it))
    compiled = exp.train_fn.compile(state, batch)
    arg_shardings = compiled.input_shardings[0]  # (state, batch, reference)
    ref_leaves = jax.tree.leaves(arg_shardings[2])
    pol_leaves = jax.tree.leaves(arg_shardings[0].params)
    key = "x".join(map(str, mesh))
    out["layout"][key] = {
        "reference_like_params": len(ref_leaves) == len(pol_leaves) and all(
            a.is_equivalent_to(b, x.ndim) for a, b, x in zip(ref_leaves, pol_leaves, jax.tree.leaves(state.params))),
        "reference_specs": sorted({str(a.spec) for a in ref_leaves}),
        "reference_is_state_params": [x is y for x, y in zip(jax.tree.leaves(exp.reference_params),
                                                             jax.tree.leaves(state.params))].count(True),
        "embedding_shard": list(exp.reference_params["token_embed"]["embedding"].addressable_shards[0].data.shape),
        "memory": hlo.memory(compiled),
        "reference_bytes": sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(exp.reference_params)),
    }
    losses = []
    for s in range(STEPS):
      state, metrics = exp.train_fn(state, batch if s == 0 else experiment.device_batch(exp, next(it)))
      losses.append(float(metrics["loss"]))
    out["layout"][key]["reference_alive"] = not any(x.is_deleted() for x in jax.tree.leaves(exp.reference_params))
    out["losses"][key] = losses
    out["params"][key] = [np.asarray(x).ravel()[:32].tolist() for x in jax.tree.leaves(state.params)]
  for mesh in MESHES[-1:]:  # the cached reference (the default): its table scored on the mesh and gathered
    c = dpo("cached")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    exp = experiment.build(c, os.path.join(workdir, "cached"), devices=jax.devices()[: int(np.prod(mesh))])
    state, it = exp.init_fn(jax.random.key(0)), exp.pipeline.train_iterator()
    losses = []
    for s in range(STEPS):
      state, metrics = exp.train_fn(state, experiment.device_batch(exp, next(it)))
      losses.append(float(metrics["loss"]))
    out["cached_losses"]["x".join(map(str, mesh))] = losses
  return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  return run_on_8_devices(__file__, tmp_path_factory.mktemp("preference_sharding"), timeout=600)


@pytest.mark.slow
def test_dpo_losses_and_params_agree_on_every_mesh(result):
  ref = result["losses"]["1x1x1"]
  assert abs(ref[0] - np.log(2)) < 1e-6  # step 0: policy = reference
  for key, losses in result["losses"].items():
    np.testing.assert_allclose(losses, ref, atol=1e-5, rtol=0, err_msg=key)
    for a, b in zip(result["params"][key], result["params"]["1x1x1"]):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.slow
def test_a_cached_reference_scored_on_a_mesh_gives_the_live_losses(result):
  for key, losses in result["cached_losses"].items():
    np.testing.assert_allclose(losses, result["losses"]["1x1x1"], atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.slow
def test_the_reference_is_laid_out_like_the_policy_and_never_donated(result):
  layout = result["layout"]
  for key, m in layout.items():
    assert m["reference_like_params"], key  # the compiled program's own input shardings
    assert m["reference_is_state_params"] == 0 and m["reference_alive"], key  # a copy, alive after donation
  # tiny: V=512 (byte vocabulary padded), D=64: the embedding [V, D] is split (vocab: tensor, embed: fsdp)
  assert layout["1x1x1"]["embedding_shard"] == layout["8x1x1"]["embedding_shard"]  # data parallel: replicated
  full = layout["1x1x1"]["reference_bytes"]
  assert layout["8x1x1"]["reference_bytes"] == full
  assert layout["2x4x1"]["reference_bytes"] < 0.3 * full  # FSDP over 4: about a quarter per device
  assert layout["2x2x2"]["reference_bytes"] < 0.3 * full  # fsdp 2 x tensor 2
  # and the compiled step's resident arguments (state + batch + reference) shrink with it
  assert layout["2x4x1"]["memory"]["argument"] < 0.35 * layout["1x1x1"]["memory"]["argument"]


if __name__ == "__main__":
  print(json.dumps(worker(sys.argv[1])))
