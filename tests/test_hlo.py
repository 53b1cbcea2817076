"""The compiled train step on 8 simulated devices: constraints applied, collectives as the recipe
implies (kinds and bytes), state memory ~ 1/fsdp as `sharding.state_bytes_per_device` predicts.

The step is the training loop's own `experiment.build(...).train_fn`, lowered and compiled through
its `sharding.Program` (what runs is what is read). Like test_sharding.py, the 8-device work runs
in a subprocess that prints one JSON line. `--outside_rules` lowers the same jitted function with
no rules bound (the bug this file guards against): the constraint test must catch it.
"""

import json
import os
import sys

import numpy as np
import pytest
from _tiny import run_on_8_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)]
GLOBAL_BATCH, CONTEXT = 8, 32


def worker(workdir: str, outside_rules: bool = False) -> dict:
  import jax

  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from _tiny import tiny_config

  from lmobjective.run import experiment
  from lmobjective import hlo, sharding
  from lmobjective.model import count_params

  assert jax.device_count() == 8
  out = {}
  for mesh in MESHES:
    c = tiny_config(os.path.join(workdir, "cache"), **{"model.num_heads": 8, "train.batch_size": GLOBAL_BATCH})
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    exp = experiment.build(c, workdir)
    state = sharding.abstract_state(exp.init_fn.eval_shape(jax.random.key(0)), exp.state_sharding)
    batch = experiment.device_batch(exp, next(exp.pipeline.train_iterator()))
    if outside_rules:
      lowered = exp.train_fn._jit.lower(state, batch)  # what a lazily traced jax.jit did
    else:
      lowered = exp.train_fn.lower(state, batch)
    compiled = exp.train_fn.compile(state, batch)
    sizes = dict(zip(sharding.MESH_AXES, mesh))
    rows = GLOBAL_BATCH // (mesh[0] * mesh[1])
    out["x".join(map(str, mesh))] = {
        "constraints": hlo.sharding_constraints(lowered.as_text()),
        "collectives": [c._asdict() for c in hlo.collectives(compiled.as_text())],
        "memory": hlo.memory(compiled),
        "predicted_state": sharding.state_bytes_per_device(exp.model, sizes, batch_rows=rows, context=CONTEXT),
        "predicted": sharding.memory_per_device(exp.model, sizes, batch_per_device=rows, context=CONTEXT),
        "param_bytes": 4 * count_params(state.params),
        "local_param_bytes": 4 * sharding.param_bytes_per_device(exp.model, sizes)[1],
        "rows": rows, "embed": exp.model_cfg.embed_dim, "layers": exp.model_cfg.num_layers,
    }
  return out


def run_worker(tmp_path, *extra) -> dict:
  return run_on_8_devices(__file__, tmp_path, *extra, timeout=900)


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
  return run_worker(tmp_path_factory.mktemp("hlo"))


def _bytes(prog, kind, name_part=""):
  return sum(c["bytes"] for c in prog["collectives"] if c["kind"] == kind and name_part in c["op_name"])


def _activation_all_reduces(prog, layer_op):
  """Forward all-reduces of this device's [rows*T, D] float32 activations after `layer_op` (row-parallel)."""
  size = prog["rows"] * CONTEXT * prog["embed"] * 4
  return [c for c in prog["collectives"] if c["kind"] == "all-reduce" and c["bytes"] == size
          and "transpose(" not in c["op_name"] and f"/{layer_op}/dot_general" in c["op_name"]]


# Per layer: the block-output and MLP-hidden constraints; plus the backbone input, logits and the
# embedding table read (x2 for the backward pass's transposed constraints) - counted by hand from
# model.py, so an added or lost constraint shows up here.
def _expected_constraints(layers):
  return 2 * (2 * layers + 3)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["8x1x1", "2x4x1", "2x2x2", "1x1x8"])
def test_activation_constraints_are_in_the_lowered_train_step(programs, mesh):
  p = programs[mesh]
  assert p["constraints"] == _expected_constraints(p["layers"]), p["constraints"]


@pytest.mark.slow
def test_lowering_outside_the_rules_is_caught(tmp_path):
  broken = run_worker(tmp_path, "--outside_rules")
  assert all(p["constraints"] == 0 for p in broken.values())
  with pytest.raises(AssertionError):
    test_activation_constraints_are_in_the_lowered_train_step(broken, "2x2x2")


@pytest.mark.slow
def test_pure_data_parallel_all_reduces_the_gradient_and_gathers_nothing(programs):
  p = programs["8x1x1"]
  # every gradient is summed across the 8 replicas: at least one float32 copy of the parameters
  # (the tied table twice: its lookup and head gradients are reduced before they are added)
  assert p["param_bytes"] <= _bytes(p, "all-reduce") <= 1.5 * p["param_bytes"]
  assert _bytes(p, "all-gather") == 0 and _bytes(p, "all-to-all") == 0


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["4x2x1", "2x4x1", "1x8x1"])
def test_fsdp_gathers_parameters_and_reduces_gradients_to_shards(programs, mesh):
  p = programs[mesh]
  # parameters are all-gathered for use (the tied table for the lookup and for the head)...
  assert p["param_bytes"] <= _bytes(p, "all-gather") <= 1.5 * p["param_bytes"]
  # ...and gradients reduced: a reduce-scatter, or on XLA:CPU a full all-reduce then a dynamic slice
  reduced = _bytes(p, "reduce-scatter") * int(mesh.split("x")[1]) + _bytes(p, "all-reduce")
  assert reduced >= p["param_bytes"]
  assert _activation_all_reduces(p, "attn/out") == []  # no tensor axis: no activation all-reduce


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["2x2x2", "1x1x8"])
def test_tensor_parallel_all_reduces_attention_and_mlp_outputs(programs, mesh):
  p = programs[mesh]
  for op in ("attn/out", "mlp/down"):  # Megatron row-parallel: one all-reduce per layer each
    assert len(_activation_all_reduces(p, op)) == p["layers"], op
  # the vocabulary-parallel softmax reduces per-token max and sum over the tensor axis
  per_token = p["rows"] * CONTEXT * 4
  assert any(c["kind"] == "all-reduce" and c["bytes"] == per_token and "reduce_max" in c["op_name"]
             for c in p["collectives"])


@pytest.mark.slow
def test_state_memory_scales_as_one_over_fsdp(programs):
  base = programs["8x1x1"]
  for mesh, fsdp in [("4x2x1", 2), ("2x4x1", 4), ("1x8x1", 8)]:
    p = programs[mesh]
    measured = p["memory"]["state"] / base["memory"]["state"]
    predicted = p["predicted_state"] / base["predicted_state"]
    assert abs(measured - predicted) < 0.01 * predicted, (mesh, measured, predicted)
    assert abs(measured - 1 / fsdp) < 0.05 / fsdp, (mesh, measured)  # ~1/fsdp (the batch does not shrink)
  for mesh, p in programs.items():  # absolute: within 1% of the formula on every mesh
    np.testing.assert_allclose(p["memory"]["state"], p["predicted_state"], rtol=0.01, err_msg=mesh)


@pytest.mark.slow
def test_temporary_memory_is_bounded(programs):
  # An upper bound only: XLA:CPU gathers every FSDP weight up front and reduces full-size
  # gradients before slicing them, so its scratch does not shrink with fsdp the way the state
  # does. docs/scaling.md lists the measured ratios (0.9x to 3.7x of `memory_per_device`'s total).
  for mesh, p in programs.items():
    assert p["memory"]["temp"] <= 5 * p["predicted"]["total"], (mesh, p["memory"]["temp"], p["predicted"])


def table(programs: dict) -> str:
  """The docs/scaling.md table: `python tests/test_hlo.py DIR --table` (8 devices set by the caller)."""
  base = programs["8x1x1"]
  rows = ["| mesh (data, fsdp, tensor) | state bytes/device measured | predicted | measured / (8,1,1) | "
          "predicted / (8,1,1) | temp bytes measured | temp / predicted total | all-gather bytes | all-reduce bytes |",
          "|---|---|---|---|---|---|---|---|---|"]
  for mesh, p in programs.items():
    m = p["memory"]
    rows.append(f"| ({mesh.replace('x', ', ')}) | {m['state']:,} | {p['predicted_state']:,} | "
                f"{m['state'] / base['memory']['state']:.4f} | {p['predicted_state'] / base['predicted_state']:.4f} | "
                f"{m['temp']:,} | {m['temp'] / p['predicted']['total']:.2f} | {_bytes(p, 'all-gather'):,} | "
                f"{_bytes(p, 'all-reduce'):,} |")
  return "\n".join(rows)


if __name__ == "__main__":
  result = worker(sys.argv[1], outside_rules="--outside_rules" in sys.argv[2:])
  if "--table" in sys.argv[2:]:
    print(table(result))
  print(json.dumps(result))


def test_on_one_device_the_lowered_step_holds_every_constraint_and_a_bare_jit_none(tmp_path):
  """The fast tier's share, in this process: lowering only (nothing compiled), on one device."""
  import jax

  from lmobjective import hlo, sharding
  from lmobjective.run import experiment
  from _tiny import tiny_config

  exp = experiment.build(tiny_config(tmp_path / "cache"), str(tmp_path / "run"))
  state = sharding.abstract_state(exp.init_fn.eval_shape(jax.random.key(0)), exp.state_sharding)
  batch = experiment.device_batch(exp, next(exp.pipeline.train_iterator()))
  expected = _expected_constraints(exp.model_cfg.num_layers)
  assert hlo.sharding_constraints(exp.train_fn.lower(state, batch).as_text()) == expected
  assert hlo.sharding_constraints(exp.train_fn._jit.lower(state, batch).as_text()) < expected


LOOP_HLO = """HloModule m

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %x = f32[4] get-tuple-element(%p), index=1
  %r = f32[4] all-reduce(%x), replica_groups={}, to_apply=%add, metadata={op_name="jit(f)/while/body/psum"}
  %c = f32[8] call(%x), to_apply=%inner
  ROOT %t = (s32[], f32[4]) tuple(%i, %r)
}

%inner (q: f32[4]) -> f32[8] {
  %q = f32[4] parameter(0)
  ROOT %g = f32[8] all-gather(%q), dimensions={0}, metadata={op_name="jit(f)/while/body/inner/gather"}
}

%cond (p: (s32[], f32[4])) -> pred[] {
  ROOT %lt = pred[] constant(true)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4] parameter(0)
  %before = f32[8] all-gather(%a), dimensions={0}, metadata={op_name="jit(f)/gather_once"}
  %w = (s32[], f32[4]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[4] get-tuple-element(%w), index=1
}
"""


def test_loop_collectives_are_those_of_the_while_body_and_what_it_calls():
  """A hand-written module: the all-gather before the loop is not a loop collective; the body's
  all-reduce and the all-gather of a computation the body calls are."""
  from lmobjective import hlo
  assert [c.kind for c in hlo.collectives(LOOP_HLO)] == ["all-reduce", "all-gather", "all-gather"]
  loop = hlo.loop_collectives(LOOP_HLO)
  assert [(c.kind, c.op_name) for c in loop] == [
      ("all-reduce", "jit(f)/while/body/psum"), ("all-gather", "jit(f)/while/body/inner/gather")]
