"""Process-level setup that must happen before any JAX backend use: multi-host init and XLA flags.

`setup(config)` is the first thing `train.run` does. Both pieces only take effect if the XLA
backend has not started yet (the first `jax.devices()`, array or `jax.process_index()` starts
it), so entry points call it before anything else touches JAX.

Multi-host: each process runs the same program; `jax.distributed.initialize` connects them, then
`jax.devices()` lists every device of every process and jitted steps run as one SPMD program.
Each process feeds only its own rows (the data pipeline shards by process index), and only
process 0 writes logs, plots and the config; checkpoints are written collectively by orbax.
"""

from __future__ import annotations

import os

import jax

from lmobjective.config import Config


# From the JAX GPU performance guide and NVIDIA's JAX-Toolbox: overlap collectives with compute
# (latency-hiding scheduler, pipelined and double-buffered collectives in scanned layers) and
# combine small collectives. They matter with FSDP on several GPUs; on one GPU they are harmless.
# All of them parse on jaxlib 0.10.2 (tests/test_multihost.py checks that a CPU backend accepts them).
RECOMMENDED_XLA_GPU_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
)


def add_xla_flags(flags: tuple[str, ...] = RECOMMENDED_XLA_GPU_FLAGS, environ=os.environ) -> str:
  """Appends `flags` to XLA_FLAGS, leaving any flag the user already set untouched."""
  current = environ.get("XLA_FLAGS", "")
  present = {f.split("=", 1)[0] for f in current.split()}
  extra = [f for f in flags if f.split("=", 1)[0] not in present]
  environ["XLA_FLAGS"] = " ".join(current.split() + extra)
  return environ["XLA_FLAGS"]


def initialize(config: Config) -> bool:
  """Calls jax.distributed.initialize when the config asks for it. Returns whether it did."""
  d = config.distributed
  if d.coordinator_address is not None:
    jax.distributed.initialize(coordinator_address=d.coordinator_address,
                               num_processes=d.num_processes, process_id=d.process_id)
    return True
  if d.auto_detect:  # SLURM, Open MPI, TPU pods, Kubernetes JobSets: jax reads the environment
    jax.distributed.initialize()
    return True
  return False


def setup(config: Config) -> None:
  """XLA flags, then multi-host initialisation. Call before any other JAX use (after `validation.validate`)."""
  if config.train.xla_gpu_flags:
    add_xla_flags()
  if jax.distributed.is_initialized():  # e.g. a launcher or a test already did it
    return
  initialize(config)


def is_lead() -> bool:
  """Process 0 writes files; the others only compute."""
  return jax.process_index() == 0
