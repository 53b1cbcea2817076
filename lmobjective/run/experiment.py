"""An experiment built from a config: data pipeline, model, mesh, jitted train/eval steps, and eval.

`build(config, workdir)` is everything a run needs before its first step (`train.run` adds the loop,
checkpoints and logs); notebooks and tests use it to step a model by hand:

    exp = experiment.build(config, workdir)
    state = exp.init_fn(jax.random.key(config.seed))
    state, metrics = exp.train_fn(state, experiment.device_batch(exp, next(exp.pipeline.train_iterator())))
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from lmobjective import config as config_lib
from lmobjective import data, objectives, sharding, step, validation
from lmobjective.objectives import interface as objective_interface
from lmobjective.model import ModelConfig, Transformer, flops_per_token
from lmobjective.optimizer import make_optimizer, skipped_update_state
from lmobjective.run import hardware, reference_cache, stage


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built once from the config."""
  config: config_lib.Config  # the typed view every reader uses
  raw_config: ml_collections.ConfigDict  # as given: what config.json and checkpoints record
  workdir: str
  mesh: Mesh
  model: Transformer
  model_cfg: ModelConfig
  tx: optax.GradientTransformation
  objective: objectives.Objective  # what the steps optimise and evaluate (`config.objective`)
  tokenizer: data.Tokenizer
  pipeline: data.Pipeline
  state_sharding: step.TrainState  # of NamedShardings
  train_fn: sharding.Program  # (state, batch) -> (state, metrics)
  eval_fn: sharding.Program  # (params, batch) -> the objective's eval sums
  init_fn: sharding.Program | stage.SeededInit  # (key) -> state
  eval_sets: dict[str, list[dict]]
  flops_per_token: float
  peak_flops: float | None
  origin: stage.Origin | None = None  # train.init_from, resolved; None = from scratch
  # The origin's params, sharded like the policy's and never donated (init_fn copies them): the
  # frozen reference of a preference objective. None without train.init_from.
  reference_params: Any = None
  # What `device_batch` sends: the objective's fields (the model's, and reference_logps with a cached reference).
  batch_fields: tuple[str, ...] = step.MODEL_FIELDS


def _check_batch_divides(config, mesh) -> None:
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = config.train.batch_size // config.train.grad_accum_steps
  if micro % dp:
    raise config_lib.ConfigError(
        "train.batch_size", config.train.batch_size,
        f"batch_size/grad_accum_steps={micro} must be divisible by the data*fsdp mesh size {dp}")
  if config.eval.batch_size % dp or config.eval.batch_size % jax.process_count():
    raise config_lib.ConfigError("eval.batch_size", config.eval.batch_size,
                                 f"must be divisible by the data*fsdp mesh size {dp}")


def _check_same_tokenizer(tokenizer, workdir: str) -> None:
  """Each process trained or loaded its own tokenizer; one that differs would feed other token ids."""
  from jax.experimental import multihost_utils
  mine = np.frombuffer(bytes.fromhex(tokenizer.fingerprint()), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine))
  if (every != every[0]).any():
    raise config_lib.ConfigError("data.tokenizer", os.path.join(workdir, "tokenizer"),
                                 f"differs across processes (fingerprints {[bytes(f).hex() for f in every]})")


def _check_vocab_fits(model, mesh, tokenizer) -> None:
  """The model's vocabulary holds the tokenizer's and splits evenly over mesh.tensor."""
  vocab, tensor = model.vocab_size or tokenizer.vocab_size, mesh.shape["tensor"]
  if vocab < tokenizer.vocab_size:
    raise config_lib.ConfigError("model.vocab_size", vocab, f"must be >= the tokenizer's vocabulary {tokenizer.vocab_size}")
  if vocab % tensor:  # an explicit model.vocab_size was checked with the mesh already
    raise config_lib.ConfigError("model.vocab_size", model.vocab_size,
                                 f"the tokenizer's vocabulary {vocab} is not a multiple of mesh.tensor={tensor}: "
                                 f"set model.vocab_size to one (e.g. {-(-vocab // tensor) * tensor})")


def _guarded_step(train_step, state, batch, *frozen):
  """`train_step`, except that a non-finite loss or gradient leaves params and Adam's state as they were.

  The step counter and the learning-rate schedule still advance (the data moves on, and step s
  always uses lr(s): `optimizer.skipped_update_state`); metrics['finite'] tells the host, which
  stops (train.nan_policy='stop') or logs the skip. `where(True, new, old)` is `new` bit for bit.
  """
  new, metrics = train_step(state, batch, *frozen)
  ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
  keep = lambda n, o: jnp.where(ok, n, o)
  skipped_opt_state = skipped_update_state(state.opt_state, new.opt_state)
  new = new.replace(params=jax.tree.map(keep, new.params, state.params),
                    opt_state=jax.tree.map(keep, new.opt_state, skipped_opt_state))
  return new, {**metrics, "finite": ok}


def _check_margins(config, pipeline, objective) -> None:
  """Pairs that carry a `margin` train a reward model (Bradley–Terry past the margin); an objective that
  does not read the batch's margin field is refused rather than silently training on other data."""
  if step.MARGIN in objective.fields:
    return
  for name, src in zip(pipeline.source_names, pipeline.sources):
    if src.info.get("pairs_with_margin"):
      raise config_lib.ConfigError(f"data.sources.{name}.path", config.data.sources[name].path,
                                   f"its pairs carry a 'margin', which only objective.kind=reward_model reads "
                                   f"(objective.kind={config.objective.kind!r} would ignore it)")


def build(raw_config: ml_collections.ConfigDict, workdir: str, devices=None) -> Experiment:
  """`devices`: the devices to lay the mesh over (default: all of every process)."""
  config = config_lib.typed(raw_config)
  mesh = sharding.make_mesh(config.mesh, devices)
  _check_batch_divides(config, mesh)
  validation.check_mesh_divides(mesh.shape, validation.sharded_dims(config.model))  # -1 axes resolved
  origin_req = stage.request(config.train.init_from, workdir) if config.train.init_from else None
  tokenizer, save_tokenizer = (  # saved once all checks passed
      stage.prepare_tokenizer(config.data, workdir, origin_req) if origin_req else
      data.prepare_tokenizer(config.data, workdir))
  _check_vocab_fits(config.model, mesh, tokenizer)
  n_proc = jax.process_count()
  if n_proc > 1:
    _check_same_tokenizer(tokenizer, workdir)
  pipeline = data.build_pipeline(
      config.data, tokenizer, seed=config.seed, batch_size=config.train.batch_size // n_proc,
      process_index=jax.process_index(), process_count=n_proc, cache_dir=config.data.cache_dir)
  T = config.data.context_length
  ms = model_and_state(config, raw_config, mesh, tokenizer, origin_req,
                       config.train.batch_size // config.train.grad_accum_steps)
  model, model_cfg, tx, params_sharding, state_sharding = ms.model, ms.model_cfg, ms.tx, ms.params_sharding, ms.state_sharding
  init_fn, origin, reference = ms.init_fn, ms.origin, ms.reference
  objective = objectives.from_config(config.objective, config.rl)
  _check_margins(config, pipeline, objective)  # before the reference cache is written
  cached = objective.cached_reference
  if cached:  # before the eval batches are cut: they carry the values too
    pipeline.attach_reference(reference_cache.prepare(
        config, pipeline, model, model_cfg, mesh, params_sharding, reference, origin.params_fingerprint,
        data.cache.directory(config.data)))
  token_bytes = jnp.asarray(tokenizer.token_byte_lengths(), jnp.int32)
  train_fn, eval_fn = _step_programs(config, objective, model, tx, mesh, state_sharding, params_sharding,
                                     token_bytes, reference_params=None if cached else reference)
  per_proc_eval = config.eval.batch_size // n_proc
  eval_sets = {name: pipeline.eval_batches(name, config.eval.num_batches, per_proc_eval)
               for name in pipeline.source_names} if config.eval.num_batches else {}
  save_tokenizer()
  return Experiment(
      config=config, raw_config=raw_config, workdir=workdir, mesh=mesh, model=model, model_cfg=model_cfg, tx=tx,
      objective=objective, tokenizer=tokenizer, pipeline=pipeline, state_sharding=state_sharding, train_fn=train_fn,
      eval_fn=eval_fn, init_fn=init_fn, eval_sets=eval_sets,
      flops_per_token=flops_per_token(model_cfg, T),
      peak_flops=hardware.peak_flops_per_device(config.model.compute_dtype), origin=origin,
      reference_params=reference, batch_fields=objective.fields)


@dataclasses.dataclass
class ModelState:
  """The model, its optimizer, the state's shardings and how step 0's state is made (`model_and_state`)."""
  model: Transformer
  model_cfg: ModelConfig
  tx: optax.GradientTransformation
  params_sharding: Any
  state_sharding: step.TrainState
  init_fn: sharding.Program | stage.SeededInit
  origin: stage.Origin | None
  reference: Any  # the origin's params (the frozen reference), None from scratch


def model_and_state(config, raw_config, mesh, tokenizer, origin_req, micro_rows: int) -> ModelState:
  """The model for `tokenizer`, an optimizer over every update of the run (`config.decay_steps`), the
  state's shardings (from a microbatch of `micro_rows` rows) and its init: from scratch, or from the
  origin's params (a copy) with a fresh optimizer state when `origin_req` is given."""
  model_cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size, config.data.context_length)
  model = objectives.model_class(config.objective.kind)(model_cfg)
  tx = make_optimizer(config.optimizer, config.train.steps * objectives.updates_per_step(config),
                      sharding.logical_axes(model))
  micro_shape = (micro_rows, config.data.context_length)
  with sharding.activate(mesh):
    params_sharding = sharding.param_shardings(model, mesh, micro_shape)
    init = functools.partial(step.init_state, model, tx, batch_shape=micro_shape)
    state_shape = jax.eval_shape(init, jax.random.key(0))
    state_sharding = sharding.state_shardings(state_shape, params_sharding, mesh)
  init_fn = sharding.Program(init, mesh, out_shardings=state_sharding)
  origin, reference = None, None
  if origin_req:
    abstract = sharding.abstract_state(state_shape.params, state_sharding.params)
    origin, reference = stage.load(origin_req, raw_config, abstract, tokenizer)
    fresh = functools.partial(step.init_params, model, batch_shape=micro_shape)  # heads the origin lacks
    init_fn = stage.SeededInit(sharding.Program(functools.partial(stage.start_state, tx, init_params=fresh), mesh,
                                                out_shardings=state_sharding), reference)
  return ModelState(model, model_cfg, tx, params_sharding, state_sharding, init_fn, origin, reference)


def compile_train_step_ahead(exp: Experiment, abstract_state) -> None:
  """Starts compiling the train step on a background thread (`sharding.Program.compile_ahead`) from
  the abstract state and batch, so that XLA compiles it while the state is initialised or restored;
  the first step waits for it. (A cached reference's batches carry one more field: not ahead.)"""
  if step.REFERENCE_LOGPS in exp.batch_fields:
    return
  rows = exp.config.train.batch_size * exp.pipeline.rows_per_example
  exp.train_fn.compile_ahead(abstract_state, sharding.abstract_batch(
      exp.batch_fields, rows, exp.config.data.context_length, exp.mesh))


def _step_programs(config, objective, model, tx, mesh, state_sharding, params_sharding, token_bytes,
                   reference_params):
  """The jitted train step `(state, batch) -> (state, metrics)` and eval step `(params, batch) -> sums`
  of `objective`. A live reference (`reference_params` given to an objective that needs one) is an
  argument of both programs, sharded like the policy's params and bound here (`sharding.Bound`),
  never donated; a cached one (None) comes in the batch, and the programs take no reference params."""
  batch_shard, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  train = functools.partial(step.train_step, model=model, tx=tx, objective=objective,
                            grad_accum_steps=config.train.grad_accum_steps)
  evaluate_ = functools.partial(step.eval_step, model=model, objective=objective, token_bytes_V=token_bytes)
  live = objective.needs_reference and reference_params is not None
  frozen, frozen_shardings = ((reference_params,), (params_sharding,)) if live else ((), ())
  train_fn = sharding.Program(functools.partial(_guarded_step, train), mesh,
                              in_shardings=(state_sharding, batch_shard, *frozen_shardings),
                              out_shardings=(state_sharding, rep), donate_argnums=0)
  eval_fn = sharding.Program(evaluate_, mesh, in_shardings=(params_sharding, batch_shard, *frozen_shardings),
                             out_shardings=rep)
  if frozen:
    return sharding.Bound(train_fn, *frozen), sharding.Bound(eval_fn, *frozen)
  return train_fn, eval_fn


def device_batch(exp: Experiment, host_batch: dict) -> dict:
  return sharding.global_batch({k: host_batch[k] for k in exp.batch_fields}, exp.mesh)


def evaluate(exp: Experiment, params) -> dict[str, float]:
  """The objective's val_* metrics (`Objective.eval_record`) from each source's eval batches, their sums
  added in float64 on the host."""
  per_source = {}
  for name, batches in exp.eval_sets.items():
    for host_batch in batches:
      per_source[name] = exp.objective.add_host(
          per_source.get(name), objective_interface.host_sums(exp.eval_fn(params, device_batch(exp, host_batch))))
  return exp.objective.eval_record(per_source)
