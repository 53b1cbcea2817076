"""Multi-host: 2 processes x 2 CPU devices (jax.distributed over gloo on localhost) train exactly
like 1 process x 4 devices through the whole training CLI (one global mesh, outputs written once,
collective checkpoints, resume), a cached DPO reference gathered on every process; the XLA flag
switch and the distributed config keys. (A bare-steps twin of the CLI test, the same comparison
without the CLI, was dropped on 2026-12-07 to keep the suite within its budget.)

The DPO workers run as subprocesses (`python tests/test_multihost.py dpo WORKDIR PROCESS_ID
NUM_PROCESSES PORT`), each printing one JSON line; NUM_PROCESSES=1 is the single-process reference.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
DEVICES = 4


def dpo_worker(workdir: str, process_id: int, num_processes: int, port: int) -> dict:
  """A cached-reference DPO stage from WORKDIR/origin (trained by the single-process run), the data
  cache per process (WORKDIR/cache_<n>_<id>: not shared); its tables, losses and what it printed."""
  import contextlib
  import io
  import pathlib

  import jax

  jax.config.update("jax_num_cpu_devices", DEVICES // num_processes)
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  sys.path.insert(0, os.path.join(ROOT, "tests", "faults"))
  from _faults import write_text
  from _stages import stage_config
  from test_preference_sharding import _pairs_file
  from lmobjective.run import distributed, experiment, train

  d, common = pathlib.Path(workdir), {"data.tokenizer.kind": "byte", "data.context_length": 24}
  if num_processes == 1:
    origin = stage_config(d / "cache_origin", "text", write_text(d / "corpus.txt"), **common,
                          **{"train.steps": 2, "eval.num_batches": 0})
    with contextlib.redirect_stdout(io.StringIO()):
      train.run(origin, str(d / "origin"))
    _pairs_file(str(d / "pairs.jsonl"))
  cache = d / f"cache_{num_processes}_{process_id}"
  c = stage_config(cache, "preference_jsonl", d / "pairs.jsonl", **common, **{
      "objective.kind": "dpo", "train.init_from": str(d / "origin"), "eval.num_batches": 0})
  if num_processes > 1:
    c.distributed.coordinator_address = f"localhost:{port}"
    c.distributed.num_processes, c.distributed.process_id = num_processes, process_id
  distributed.setup(c)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exp = experiment.build(c, str(d / f"dpo{num_processes}"))
  state, it, losses = exp.init_fn(jax.random.key(0)), exp.pipeline.train_iterator(), []
  for _ in range(STEPS):
    state, metrics = exp.train_fn(state, experiment.device_batch(exp, next(it)))
    losses.append(float(metrics["loss"]))
  tables = {s: t.tolist() for s, t in exp.pipeline.reference_logps["preference"].items()}
  out = {"tables": tables, "losses": losses, "printed": printed.getvalue(),
         "files": sorted(f for f in os.listdir(cache) if "-reference-" in f)}
  if num_processes > 1:
    jax.distributed.shutdown()
  return out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, num_processes, *mode):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, __file__, *mode, str(workdir), str(i), str(num_processes), str(port)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(num_processes)]
  outs = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  return outs


@pytest.mark.slow
def test_a_cached_reference_on_two_processes_matches_one_process(tmp_path):
  """Each process feeds its share of the pairs; the tables are gathered by pair id, so both processes
  hold the single process's table, and each writes its own copy (the cache dirs are not shared).
  Then one process finds its file and the other does not: both score again (none waits alone)."""
  (single,) = _launch(tmp_path, 1, "dpo")
  assert "reference log-probs of 'preference': built" in single["printed"]
  multi = _launch(tmp_path, 2, "dpo")
  for out in multi:
    for split in ("train", "val"):
      np.testing.assert_allclose(out["tables"][split], single["tables"][split], atol=1e-5, rtol=0, err_msg=split)
    np.testing.assert_allclose(out["losses"], single["losses"], atol=1e-5, rtol=0)
    assert out["files"] == single["files"]  # the same key: the same file name on every host
  assert multi[0]["tables"] == multi[1]["tables"]
  assert "built" in multi[0]["printed"] and multi[1]["printed"] == ""  # only the lead prints
  os.remove(tmp_path / "cache_2_1" / multi[1]["files"][0])
  again = _launch(tmp_path, 2, "dpo")
  assert "built" in again[0]["printed"] and again[1]["files"] == multi[1]["files"]


def _train_cli(workdir, cache, devices_per_process: int, num_processes: int, *overrides) -> list[str]:
  """`python -m lmobjective.train` as a researcher launches it, once per process; their stdouts."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  cmd = [sys.executable, "-m", "lmobjective.train", "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--config.data.cache_dir={cache}", "--config.train.steps=8", "--config.eval.every_steps=4",
         "--config.checkpoint.every_steps=4", *overrides]
  port = _free_port()
  dist = lambda i: [f"--config.distributed.coordinator_address=localhost:{port}",
                    f"--config.distributed.num_processes={num_processes}", f"--config.distributed.process_id={i}"]
  procs = [subprocess.Popen(cmd + (dist(i) if num_processes > 1 else []), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(num_processes)]
  outs = []
  for i, p in enumerate(procs):
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, f"process {i}: {stderr[-3000:]}"
    outs.append(stdout)
  return outs


def _by_step(records, key):
  return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.slow
def test_training_cli_on_two_processes_matches_one_process(tmp_path):
  """The whole `train.run` (tokenizer, cache, loop, evals, checkpoints, plots) over 2 processes x 2
  devices, both starting on an empty cache at once, against 1 process x 4 devices."""
  import jax

  import lmobjective
  from lmobjective.run import metrics_log

  one, two = tmp_path / "one", tmp_path / "two"
  (out1,) = _train_cli(one, tmp_path / "cache1", 4, 1)
  lead, other = _train_cli(two, tmp_path / "cache2", 2, 2)
  ref, got = metrics_log.read_metrics(str(one)), metrics_log.read_metrics(str(two))
  # Only process 0 writes: one metrics line per step and eval (a second writer repeats them; this
  # failed with MetricsWriter enabled on both processes, in the runs where process 1's appends landed).
  assert [r["step"] for r in got if "train_loss" in r] == list(range(1, 9))
  assert [r["step"] for r in got if "val_loss" in r] == [0, 4, 8]
  for key in ("train_loss", "val_loss", "val_loss/markov", "grad_norm"):
    want, have = _by_step(ref, key), _by_step(got, key)
    assert sorted(have) == sorted(want), key
    np.testing.assert_allclose([have[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                               atol=1e-5, rtol=0, err_msg=key)
  assert _by_step(got, "tokens_seen")[8] == 8 * 8 * 32  # counted over both processes' batches
  assert "final val loss" in lead and "lmobjective | devices 4" in lead  # 2 x 2 devices: one global mesh
  assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in lead and "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in out1
  assert "final val loss" not in other and "lmobjective |" not in other
  for name in ("config.json", "loss_curves.png", "diagnostics.json", "val_loss_by_position.json"):
    assert (two / name).exists(), name
  # The checkpoint both processes wrote collectively restores in this one process, equal to the
  # single-process run's.
  a, b = lmobjective.restore(str(one)), lmobjective.restore(str(two))
  assert a.step == b.step == 8 and a.tokenizer.fingerprint() == b.tokenizer.fingerprint()
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):  # 8 Adam steps: summation-order
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4, rtol=0)  # noise is ~1e-5
  # Both processes resume from it: the run goes on to step 10 with every step logged once.
  lead, other = _train_cli(two, tmp_path / "cache2", 2, 2, "--config.train.steps=10",
                           "--config.checkpoint.allow_config_change=true")
  assert "resuming from the checkpoint at step 8" in lead and "resuming" not in other
  got = metrics_log.read_metrics(str(two))
  assert [r["step"] for r in got if "train_loss" in r] == list(range(1, 11))
  assert lmobjective.restore(str(two)).step == 10


def test_xla_gpu_flags_are_appended_once_and_parse(tmp_path):
  from lmobjective.run import distributed

  env = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false"}
  flags = distributed.add_xla_flags(environ=env)
  assert flags.split()[0] == "--xla_gpu_enable_latency_hiding_scheduler=false"  # the user's value wins
  assert len(flags.split()) == len(distributed.RECOMMENDED_XLA_GPU_FLAGS)
  assert distributed.add_xla_flags(environ=env) == flags  # idempotent
  # An unknown XLA flag aborts the process at backend start, so check that jaxlib knows them all.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(distributed.RECOMMENDED_XLA_GPU_FLAGS))
  code = "import jax, jax.numpy as jnp; print(float(jax.jit(lambda x: x + 1)(jnp.ones(()))))"
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "2.0", proc.stderr[-2000:]


def test_distributed_config_is_validated():
  from lmobjective.run import distributed
  from lmobjective import validation
  from lmobjective.config import ConfigError, load_config_file

  c = load_config_file(os.path.join(ROOT, "configs/tiny.py"))
  validation.validate(c)
  assert not distributed.initialize(c)  # nothing configured: single process, no call
  c.distributed.coordinator_address = "localhost:1234"
  with pytest.raises(ConfigError, match="together"):
    validation.validate(c)
  c.distributed.num_processes, c.distributed.process_id = 2, 2
  with pytest.raises(ConfigError, match="process_id"):
    validation.validate(c)


if __name__ == "__main__":
  assert sys.argv[1] == "dpo", sys.argv
  print(json.dumps(dpo_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
