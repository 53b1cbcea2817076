"""Import a Hugging Face model directory onto a mesh: each device reads only its slice of each tensor.

A group of one tensor for one param whose every device slice is a block of the tensor (`Group.slice_map`:
Llama's projections, embeddings and heads, norms; a transpose or reshape) is placed straight on the
param's sharding with `jax.make_array_from_callback`, each device's callback reading its block from the
file and transposing/reshaping it in NumPy: nothing but the param itself is ever on the devices, and the
host holds one device's block at a time. Any other group (GPT-2's fused c_attn; a split that is no
block) is placed in its own layout on the sharding that XLA propagates back from the params' own
shardings through `keymap.Group.to_hf` (a transpose maps the head's [D,V] split to [V,D]'s), each device
reading its slice, and one jitted `to_ours` per group then reshapes it onto the params' shardings with no
communication, the source array dropped. So a device reads exactly the part of each tensor it keeps, and
the host never holds a full copy of the model. Every key and shape is checked before anything is read
(`check`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lmobjective import sharding as sharding_lib
from lmobjective.hf import configs, keymap
from lmobjective.hf.configs import HFError
from lmobjective.hf.safetensors_dir import SafetensorsDir


def groups_for(hf: dict, cfg, hf_vocab: int | None = None, keys=()) -> list[keymap.Group]:
  """The key map of `hf`'s family for the resolved model `cfg` (a `model.ModelConfig`)."""
  kind = hf["model_type"]
  vocab = hf_vocab or hf["vocab_size"]
  if kind == "gpt2":
    prefix = "" if "wte.weight" in keys and "transformer.wte.weight" not in keys else "transformer."
    return keymap.gpt2(cfg, vocab, prefix)
  keys_of = configs.model_keys(hf, "config.json", None)
  return keymap.llama(cfg, vocab, keys_of["attention_bias"], keys_of["mlp_bias"])


def _get(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _leaves(tree: dict, prefix=()) -> list[tuple[str, ...]]:
  out = []
  for k, v in tree.items():
    out += _leaves(v, prefix + (k,)) if isinstance(v, dict) else [prefix + (k,)]
  return out


def _target(abstract: dict, cfg, layer: int | None, path: tuple[str, ...]):
  """(shape, sharding) of one layer's (or a top-level) param from the abstract params tree."""
  full = keymap.layer_path(cfg, layer, path) if layer is not None else path
  leaf = _get(abstract, full)
  if layer is not None and cfg.scan_layers:  # one layer of the stacked param
    spec = leaf.sharding.spec
    return leaf.shape[1:], NamedSharding(leaf.sharding.mesh, P(*spec[1:]))
  return leaf.shape, leaf.sharding


def check(ckpt: SafetensorsDir, groups, cfg, abstract: dict, tied: bool) -> None:
  """Every key the model needs is there with the shape it needs (`to_hf` of the params' shapes), every
  param comes from one key, and no key is left unused (but buffers and a tied copy of the head)."""
  entries = keymap.expand(groups, cfg.num_layers)
  have = set(ckpt.keys())
  used = set()
  for g, layer, keys in entries:
    shapes = [jax.ShapeDtypeStruct(_target(abstract, cfg, layer, p)[0], np.float32) for p in g.ours]
    want = jax.eval_shape(g.to_hf, *shapes)
    for key, w in zip(keys, want):
      if key not in have:
        raise HFError(f"{ckpt.path}: no tensor {key!r}, which the model config.json describes needs")
      if ckpt.shape(key) != tuple(w.shape):
        raise HFError(f"{ckpt.where(key)}: {key!r} has shape {list(ckpt.shape(key))}; config.json's model needs "
                      f"{list(w.shape)}")
      used.add(key)
  covered = {keymap.layer_path(cfg, i, p) if i is not None else p for g, i, _ in entries for p in g.ours}
  missing = [p for p in _leaves(abstract) if p not in covered and p[0] != "score_head"]
  if missing:
    raise AssertionError(f"the key map leaves params unset: {missing[:4]}")  # a bug here, not bad input
  extra = [k for k in have - used if not k.endswith(keymap.SKIPPED) and not (tied and k == "lm_head.weight")]
  if extra:
    raise HFError(f"{ckpt.where(sorted(extra)[0])}: {sorted(extra)[0]!r} (and {len(extra) - 1} more) is not a "
                  "parameter of the model config.json describes")


@functools.lru_cache(maxsize=None)
def source_shardings(to_hf, targets: tuple) -> tuple:
  """The shardings of a group's HF tensors that its params' shardings (`targets`: ShapeDtypeStructs with
  shardings) imply: XLA's propagation through `to_hf`, so that `to_ours` of them needs no communication."""
  return tuple(jax.jit(to_hf).lower(*targets).compile().output_shardings)


def read_placed(ckpt: SafetensorsDir, key: str, sharding, dtype, reads: list | None = None) -> jax.Array:
  """`key` on `sharding` in its own layout; each device's callback reads its slice (`reads` records
  (key, index, the sharding's shard shape))."""
  shape = ckpt.shape(key)

  blocks = {}  # replicas share one host array

  def callback(index):
    if reads is not None:
      reads.append((key, index, sharding.shard_shape(shape)))
    r = _ranges(index, shape)
    if r not in blocks:
      blocks[r] = ckpt.read(key, index, dtype)
    return blocks[r]
  array = jax.make_array_from_callback(shape, sharding, callback)
  blocks.clear()
  return array


def _release_freed_memory() -> None:
  """glibc keeps freed heap memory for reuse; give it back (the host's copies of one tensor are freed by now)."""
  with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to give back
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _ranges(index, shape) -> keymap.Ranges:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def read_mapped(ckpt: SafetensorsDir, key: str, g: keymap.Group, shape, sharding, dtype,
                reads: list | None = None) -> jax.Array | None:
  """The param of one-tensor group `g` on `sharding`, each device's block read and transformed on the
  host (`g.slice_map`); None when some device's slice is not a block of the tensor."""
  plans = {}
  for index in sharding.devices_indices_map(shape).values():
    r = _ranges(index, shape)
    plans[r] = g.slice_map(r)
    if plans[r] is None:
      return None

  blocks = {}  # devices holding the same block (replicas) are given one host array

  def callback(index):
    r = _ranges(index, shape)
    hf_index, transform = plans[r]
    part = ckpt.view(key)[hf_index]
    if reads is not None:
      reads.append((key, hf_index, part.shape))
    if r not in blocks:
      out = np.asarray(transform(part), dtype=dtype, order="C")  # one copy out of the file: sliced, transposed
      blocks[r] = out.copy() if np.may_share_memory(out, part) else out  # never the file's own pages
    return blocks[r]
  array = jax.make_array_from_callback(shape, sharding, callback)
  blocks.clear()
  return array


@functools.lru_cache(maxsize=None)
def _placer(to_ours, out_shardings):
  return jax.jit(to_ours, out_shardings=out_shardings)


def load(path: str, hf: dict, cfg, abstract: dict, reads: list | None = None) -> dict:
  """The params of HF directory `path` on `abstract`'s shardings (a tree of ShapeDtypeStructs with
  NamedShardings on one mesh, as `sharding.param_shardings` gives). `reads`: every callback's (key, index)."""
  ckpt = SafetensorsDir(path)
  groups = groups_for(hf, cfg, keys=set(ckpt.keys()))
  check(ckpt, groups, cfg, abstract, cfg.tie_embeddings)
  mesh = jax.tree.leaves(abstract)[0].sharding.mesh
  dtype = np.dtype(jax.tree.leaves(abstract)[0].dtype)
  params, stacked = {}, {}
  for g, layer, keys in keymap.expand(groups, cfg.num_layers):
    placed = [_target(abstract, cfg, layer, p) for p in g.ours]
    targets = tuple(sh for _, sh in placed)
    direct = None if g.slice_map is None else read_mapped(ckpt, keys[0], g, *placed[0], dtype, reads)
    if direct is not None:
      outs = (direct,)
      _release_freed_memory()
    else:
      with sharding_lib.activate(mesh):
        src = source_shardings(g.to_hf, tuple(jax.ShapeDtypeStruct(s, dtype, sharding=sh) for s, sh in placed))
        sources = [read_placed(ckpt, k, sh, dtype, reads) for k, sh in zip(keys, src)]
        outs = _placer(g.to_ours, targets)(*sources)
      del sources
    for p, out in zip(g.ours, outs):
      if layer is not None and cfg.scan_layers:
        stacked.setdefault(p, []).append(out)
      else:
        _set(params, keymap.layer_path(cfg, layer, p) if layer is not None else p, out)
  for p, layers in stacked.items():  # scan_layers: one stacked param per block param
    full = keymap.layer_path(cfg, 0, p)
    with sharding_lib.activate(mesh):
      _set(params, full, jax.jit(lambda *xs: jax.numpy.stack(xs), out_shardings=_get(abstract, full).sharding)(*layers))
  return params


def model_config(hf: dict, file: str, context_length: int | None = None, param_dtype: str = "float32",
                 scan_layers: bool = False, tokenizer_vocab: int | None = None):
  """The resolved `model.ModelConfig` of `hf` (a config.json dict): `config.model`'s defaults
  (configs/default.py) with the keys `configs.model_keys` reads from it. With a tokenizer smaller than
  the embedding (`tokenizer_vocab`; HF checkpoints often pad it), the ids past it get -inf logits."""
  from lmobjective import config as config_lib
  from lmobjective.model import ModelConfig
  c = config_lib.load_config_file(config_lib.DEFAULT_CONFIG)
  for key, value in configs.model_keys(hf, file, context_length).items():
    c.model[key] = value
  c.model.param_dtype, c.model.scan_layers = param_dtype, scan_layers
  m = config_lib.section(config_lib.ModelSection, c.model, "model.")
  vocab = tokenizer_vocab or hf["vocab_size"]
  if vocab > hf["vocab_size"]:
    raise HFError(f"{os.path.join(os.path.dirname(file), 'tokenizer.json')}: {vocab} ids; {file}'s vocab_size is "
                  f"{hf['vocab_size']}: the tokenizer does not fit the model's embedding")
  return ModelConfig.from_config(m, vocab, context_length or hf.get("max_position_embeddings") or hf.get("n_positions"))


def import_model(path: str, mesh=None, context_length: int | None = None, reads: list | None = None, **kw):
  """(Transformer, params, hf config dict) of the HF directory `path`, its params placed on `mesh`
  (default: this process's first device) by the model's own logical axis rules."""
  from lmobjective.model import Transformer
  hf = configs.read(path)
  cfg = model_config(hf, os.path.join(path, "config.json"), context_length, **kw)  # scan_layers, tokenizer_vocab, ...
  model = Transformer(cfg)
  mesh = mesh if mesh is not None else sharding_lib.single_device_mesh()
  with sharding_lib.activate(mesh):
    shardings = sharding_lib.param_shardings(model, mesh, (1, 1))
  shapes = nn_unboxed_shapes(model)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  return model, load(path, hf, cfg, abstract, reads), hf


def nn_unboxed_shapes(model) -> dict:
  import flax.linen as nn
  return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 1), jax.numpy.int32))["params"])
