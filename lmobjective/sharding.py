"""Device mesh and shardings. The logical-axis -> mesh-axis rules live here, and only here.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel + parameter/optimizer sharding),
`tensor` (heads, MLP and vocabulary split). The batch shards over data x fsdp.
The mesh uses Auto axes: Linen's logical constraints require them (jax.make_mesh's default,
Explicit, turns with_sharding_constraint into an assert).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lmobjective.batch import ROW_FIELDS, field_dtype
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


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 (at most one) to the remaining devices; the product must equal num_devices."""
  sizes = [getattr(mesh_cfg, a) for a in MESH_AXES]
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


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def single_device_mesh(device=None) -> Mesh:
  """A (1,1,1) mesh on `device` (default: the first): notebooks and `evaluate` on one device."""
  device = jax.devices()[0] if device is None else device
  return Mesh(np.array([device]).reshape(1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


@contextlib.contextmanager
def activate(mesh: Mesh):
  """Mesh + logical rules for tracing model code (jax.set_mesh, not the deprecated `with mesh:`)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield


class Program:
  """A jitted function that is always traced, lowered and compiled with the mesh rules bound.

  `jax.jit` traces at its first call, wherever that happens, and Flax's logical constraints
  read the rules at trace time: a jit built inside `activate(mesh)` but first called outside it
  silently drops every activation constraint. A Program lowers and compiles inside
  `activate(mesh)` ahead of time, once per input signature (shapes, dtypes, shardings), and
  runs that executable; the jitted function is reachable only through it, so no trace can
  happen without the rules. `lower`/`compile` return the very program that runs (its text,
  collectives and `memory_analysis()`), for tests and benchmarks.

  A compiled executable checks its inputs' shardings: passing an array laid out other than
  declared is an error, not a silent reshard.

  `compile_ahead` starts that compilation on a background thread from abstract arguments
  (ShapeDtypeStructs with shardings), so XLA compiles the train step while the host initialises
  the state and compiles the rest on the other core; the first call with that signature waits for
  it and runs the very executable it made (`executables` shows a mismatched signature as a second one).
  """

  def __init__(self, fn, mesh: Mesh, *, in_shardings=None, out_shardings=None, donate_argnums=(),
               static_argnames=()):
    kw = {} if in_shardings is None else {"in_shardings": in_shardings}
    if out_shardings is not None:
      kw["out_shardings"] = out_shardings
    self._jit = jax.jit(fn, donate_argnums=donate_argnums, static_argnames=static_argnames, **kw)
    self.mesh = mesh
    self._compiled: dict = {}

  def lower(self, *args, **static):
    with activate(self.mesh):
      return self._jit.lower(*args, **static)

  def compile(self, *args, **static):
    """The executable for these arguments (arrays or ShapeDtypeStructs), compiled once."""
    key = _signature(args, static)
    if key not in self._compiled:
      self._compiled[key] = self.lower(*args, **static).compile()
    elif isinstance(self._compiled[key], concurrent.futures.Future):
      self._compiled[key] = self._compiled[key].result()  # an error of the background compile raises here
    return self._compiled[key]

  def compile_ahead(self, *args, **static) -> None:
    """Starts compiling for these (abstract) arguments in the background; `compile`/`__call__` with
    the same signature wait for it. One background thread for all programs, so at most one XLA
    compilation runs beside the caller's."""
    key = _signature(args, static)
    if key not in self._compiled:
      self._compiled[key] = _background().submit(lambda: self.lower(*args, **static).compile())

  def __call__(self, *args, **static):
    return self.compile(*args, **static)(*args)

  def eval_shape(self, *args, **static):
    """Output ShapeDtypeStructs, traced with the rules bound (nothing compiled)."""
    with activate(self.mesh):
      return jax.eval_shape(functools.partial(self._jit, **static), *args)

  @property
  def executables(self) -> list:
    """Every executable this program compiled so far, in order (what actually ran)."""
    return [v.result() if isinstance(v, concurrent.futures.Future) else v for v in self._compiled.values()]


@functools.cache
def _background() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmobjective-compile")


class Bound:
  """`program` with its trailing arguments fixed, e.g. a frozen reference model's params: called,
  lowered and compiled with `(*args, *trailing)`. The trailing arrays stay arguments of the
  program (never constants folded into it) and are never donated."""

  def __init__(self, program: Program, *trailing):
    self.program, self.trailing, self.mesh = program, trailing, program.mesh

  def __call__(self, *args, **static):
    return self.program(*args, *self.trailing, **static)

  def lower(self, *args, **static):
    return self.program.lower(*args, *self.trailing, **static)

  def compile(self, *args, **static):
    return self.program.compile(*args, *self.trailing, **static)

  def compile_ahead(self, *args, **static) -> None:
    self.program.compile_ahead(*args, *self.trailing, **static)

  def eval_shape(self, *args, **static):
    return self.program.eval_shape(*args, *self.trailing, **static)

  @property
  def executables(self) -> list:
    return self.program.executables


def _leaf_signature(x):
  sharding = getattr(x, "sharding", None)
  if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
    return (tuple(x.shape), str(x.dtype), sharding, bool(getattr(x, "weak_type", False)))
  x = np.asarray(x)
  return (x.shape, str(x.dtype), None, False)


def _signature(args, static: dict):
  leaves, tree = jax.tree.flatten(args)
  return tree, tuple(_leaf_signature(x) for x in leaves), tuple(sorted(static.items()))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_axes(model: nn.Module, batch_shape: tuple[int, int] = (1, 1)):
  """The params' logical axis names as declared by the model: a PartitionSpec per leaf, e.g.
  P('embed', 'heads', 'head_dim') for a query kernel (P('layers', ...) under scan_layers)."""
  import jax.numpy as jnp

  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(batch_shape, jnp.int32))
  return nn.get_partition_spec(abstract)["params"]


def param_shardings(model: nn.Module, mesh: Mesh, batch_shape: tuple[int, int]):
  """NamedShardings for the params tree, from the logical names the model declares."""
  return nn.logical_to_mesh_sharding(logical_axes(model, batch_shape), mesh, RULES)


def state_shardings(state_shape, params_sharding, mesh: Mesh):
  """Shardings for a whole TrainState: optimizer moments follow their params, the rest replicates.

  A moment is found by its structure: a subtree of the optimizer state shaped like the params
  tree, where `optax.partition` / `optax.masked` may have put a `MaskedNode` for the params another
  group owns (Muon's momentum covers the matrices, AdamW's moments the rest). Not
  `optax.tree_map_params`: it calls `tx.init` on a placeholder, which a partition whose labels
  are a tree of the params cannot take.
  """
  rep = replicated(mesh)
  params_def = jax.tree.structure(params_sharding)
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  mirrors = lambda x: not is_masked(x) and jax.tree.structure(x, is_leaf=is_masked) == params_def
  follow = lambda x, sh: x if is_masked(x) else sh
  opt = jax.tree.map(
      lambda x: jax.tree.map(follow, x, params_sharding, is_leaf=is_masked) if mirrors(x) else rep,
      state_shape.opt_state, is_leaf=mirrors)
  return state_shape.replace(step=rep, params=params_sharding, opt_state=opt, rng=rep)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles the global batch from this process's rows (works for one or many processes)."""
  sharding = batch_sharding(mesh)
  n = jax.process_count()
  return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n,) + v.shape[1:])
          for k, v in local_batch.items()}


def abstract_batch(fields, rows: int, T: int, mesh: Mesh) -> dict:
  """ShapeDtypeStructs of the global batch `global_batch` assembles ([rows, T], or [rows] for
  `batch.ROW_FIELDS`; `batch.field_dtype`), for compiling a step before the first batch exists."""
  sh = batch_sharding(mesh)
  return {f: jax.ShapeDtypeStruct((rows,) if f in ROW_FIELDS else (rows, T), field_dtype(f), sharding=sh) for f in fields}


def abstract_state(state_shape, state_sharding):
  """ShapeDtypeStructs carrying the target shardings: an orbax restore target for *this* mesh.

  A checkpoint saved on any mesh restores onto any other by passing this as the target (orbax
  reads each shard's slice from the saved global arrays); without it orbax reuses the saved
  shardings and fails on a different device count ("Topology mismatch").
  """
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      state_shape, state_sharding)


def _mesh_axis_size(mesh_axes, sizes: dict[str, int]) -> int:
  if mesh_axes is None:
    return 1
  names = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
  return int(np.prod([sizes[a] for a in names]))


def param_bytes_per_device(model, sizes: dict[str, int]) -> tuple[int, int]:
  """(total parameter count, largest per-device parameter count) for a mesh `{axis: size}`.

  Uses the model's own logical axis names and `RULES`, so it is the sharding the code applies.
  A dimension that a mesh axis does not divide is counted as ceil(dim / axis) (GSPMD pads).
  """
  import jax.numpy as jnp

  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract), RULES)
  shapes = nn.unbox(abstract)
  total = per_device = 0
  for shape, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
    dims = list(shape.shape)
    local = 1
    for i, d in enumerate(dims):
      axis = spec[i] if i < len(spec) else None
      local *= -(-d // _mesh_axis_size(axis, sizes))
    total += int(np.prod(dims))
    per_device += local
  return total, per_device


def state_bytes_per_device(model, sizes: dict[str, int], *, batch_rows: int, context: int,
                           param_bytes: int = 4, optimizer_moments: int = 2) -> int:
  """Resident bytes per device of a train step: what `hlo.memory(compiled)["state"]` measures.

  Params and the optimizer's moments (float32, sharded like the params), plus this device's
  batch rows: four int32 fields and the bool loss mask per position. Scalars (step, counts,
  metrics) are left out: a few dozen bytes.
  """
  _, n_local = param_bytes_per_device(model, sizes)
  return n_local * (param_bytes + 4 * optimizer_moments) + batch_rows * context * (4 * 4 + 1)


def memory_per_device(model, sizes: dict[str, int], *, batch_per_device: int, context: int,
                      param_bytes: int = 4, optimizer_moments: int = 2, loss_chunk_size: int = 0
                      ) -> dict[str, float]:
  """Bytes per device of a training step, from the parameter shardings above.

  params (param_bytes each) + gradients (float32) + optimizer moments (AdamW: 2 float32), all
  sharded like the params; plus two activation terms for `batch_per_device` sequences: the
  layer inputs kept under full remat (L*b*T*D float32) and the float32 logits and their gradient
  (2*b*T*V, or 2*b*C*V with a loss chunk of C positions), which the tensor axis splits over V.
  """
  cfg = model.cfg
  n_total, n_local = param_bytes_per_device(model, sizes)
  out = {"params_total": n_total, "params": n_local * param_bytes, "grads": n_local * 4,
         "optimizer": n_local * 4 * optimizer_moments}
  out["state"] = out["params"] + out["grads"] + out["optimizer"]
  positions = min(loss_chunk_size, context) if loss_chunk_size else context
  out["remat_activations"] = cfg.num_layers * batch_per_device * context * cfg.embed_dim * 4
  out["logits"] = 2 * batch_per_device * positions * -(-cfg.vocab_size // sizes.get("tensor", 1)) * 4
  out["total"] = out["state"] + out["remat_activations"] + out["logits"]
  return out
