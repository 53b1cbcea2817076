"""Device mesh and shardings. The logical-axis -> mesh-axis rules live here, and only here.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel + parameter/optimizer sharding),
`tensor` (heads, MLP and vocabulary split). The batch shards over data x fsdp.
The mesh uses Auto axes: Linen's logical constraints require them (jax.make_mesh's default,
Explicit, turns with_sharding_constraint into an assert).
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lmobjective.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
RULES = (
    ("batch", BATCH_AXES),
    ("seq", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
)


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 (at most one) to the remaining devices; the product must equal num_devices."""
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError("mesh", tuple(sizes), "at most one of mesh.data/fsdp/tensor may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      axis = MESH_AXES[sizes.index(-1)]
      raise ConfigError(f"mesh.{axis}", -1, f"the other axes ({known}) must divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ConfigError("mesh", tuple(sizes), f"data*fsdp*tensor must equal the {num_devices} devices")
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


@contextlib.contextmanager
def activate(mesh: Mesh):
  """Mesh + logical rules for tracing model code (jax.set_mesh, not the deprecated `with mesh:`)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(model: nn.Module, mesh: Mesh, batch_shape: tuple[int, int]):
  """NamedShardings for the params tree, from the logical names the model declares."""
  import jax.numpy as jnp

  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(batch_shape, jnp.int32))
  specs = nn.get_partition_spec(abstract)["params"]
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def state_shardings(state_shape, params_sharding, tx: optax.GradientTransformation, mesh: Mesh):
  """Shardings for a whole TrainState: optimizer moments follow their params, the rest replicates."""
  rep = replicated(mesh)
  opt = optax.tree_map_params(tx, lambda _, s: s, state_shape.opt_state, params_sharding,
                              transform_non_params=lambda _: rep)
  return state_shape.replace(step=rep, params=params_sharding, opt_state=opt, rng=rep)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles the global batch from this process's rows (works for one or many processes)."""
  sharding = batch_sharding(mesh)
  n = jax.process_count()
  return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n,) + v.shape[1:])
          for k, v in local_batch.items()}
