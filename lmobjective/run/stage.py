"""The origin of a training stage: `train.init_from` = "WORKDIR" (its newest readable checkpoint), "WORKDIR:STEP",
or "hf:PATH" (a Hugging Face model directory, imported onto the stage's shardings: `lmobjective.hf`).

A stage starts at step 0 from another run's parameters: a fresh optimizer state, schedule and data
position, the origin's tokenizer (`WORKDIR/tokenizer`, never trained again, so the ids match; the
stage saves a copy in its own workdir), and the origin's model (`model.*` must agree, resolved).
The origin's parameters stay on device as the stage's frozen reference (`Experiment.reference_params`).

Every check here is one `ConfigError` line raised while the experiment is built, before the run
writes anything. The origin is recorded (`Origin.record()`) in config.json and in every
checkpoint's meta; a resumed stage reloads the recorded step, never "the newest" (which may have
moved on), and refuses if those parameters changed or are gone: its reference stays the one it
started from. An origin that moved is found at its new path when `train.init_from` names it and
`checkpoint.allow_config_change` is set (the recorded step and params are checked there).

An `hf:` origin brings its model and tokenizer: `resolve_hf` sets `model.*` from its config.json (but the
keys of FREE_MODEL_KEYS) and `data.tokenizer` to its tokenizer.json (kind hf) before the config is
validated, so the saved config.json says what ran. It is recorded as step 0 with its params' sha256; a
resumed stage imports it again and refuses if the weights changed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from lmobjective import config as config_lib
from lmobjective import objectives, step
from lmobjective.config import ConfigError
from lmobjective.data import tokenizers
from lmobjective.hf import configs as hf_configs
from lmobjective.hf import load as hf_load
from lmobjective.run import checkpoint as ckpt_lib
from lmobjective.run import lock

KEY = "train.init_from"
HF = "hf:"  # train.init_from=hf:PATH
# Keys of config.model that change how the parameters are computed or regularised, not what they
# are: a stage may set them its own way (e.g. dropout for SFT). Every other key must match.
FREE_MODEL_KEYS = ("remat", "attention", "compute_dtype", "dropout", "init_std")


@dataclasses.dataclass(frozen=True)
class Origin:
  """The checkpoint a stage started from."""
  workdir: str  # absolute (an hf: origin's model directory)
  step: int  # 0 for an hf: origin
  params_fingerprint: str  # sha256 hex of the params' `checkpoint.checksums`
  hf: bool = False

  def record(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Request:
  """Where to load the origin from: `step` None = the newest readable; `fingerprint` set on resume."""
  spec: str  # train.init_from as given
  workdir: str
  step: int | None
  fingerprint: str | None = None
  hf: bool = False


def hf_path(spec) -> str | None:
  """PATH (absolute) of "hf:PATH", else None."""
  if isinstance(spec, str) and spec.startswith(HF):
    return os.path.abspath(os.path.expanduser(spec[len(HF):]))
  return None


def resolve_hf(raw_config) -> None:
  """With train.init_from=hf:PATH: `model.*` from PATH/config.json (the keys a stage may set its own way
  stay the config's) and the tokenizer PATH's (kind hf), in `raw_config`, before it is validated."""
  path = hf_path(raw_config.train.get("init_from"))
  if path is None:
    return
  try:
    hf = hf_configs.read(path)
    keys = hf_configs.model_keys(hf, os.path.join(path, "config.json"), int(raw_config.data.context_length))
  except hf_configs.HFError as e:
    raise ConfigError(KEY, raw_config.train.init_from, str(e)) from None
  with raw_config.unlocked():
    for key, value in keys.items():
      if key not in FREE_MODEL_KEYS:
        raw_config.model[key] = value
    raw_config.data.tokenizer.kind, raw_config.data.tokenizer.path = "hf", path


def parse(spec: str) -> tuple[str, int | None]:
  """'WORKDIR' -> (absolute WORKDIR, None); 'WORKDIR:STEP' -> (absolute WORKDIR, STEP)."""
  head, sep, tail = spec.rpartition(":")
  path, at = (head, int(tail)) if sep and head and tail.isdigit() else (spec, None)
  return os.path.abspath(os.path.expanduser(path)), at


def params_fingerprint(params) -> str:
  sums = ckpt_lib.checksums({"params": params})
  return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()


# ---- which checkpoint ---------------------------------------------------------------------------


def request(spec: str, workdir: str) -> Request:
  """The origin this run's own checkpoints recorded (a resume), else the one `spec` names; checks it exists."""
  recorded = recorded_origin(workdir)
  if recorded is not None:
    return _resumed(spec, recorded)
  if hf_path(spec) is not None:
    return Request(spec, hf_path(spec), 0, hf=True)
  origin_dir, at = parse(spec)
  if origin_dir == os.path.abspath(workdir):
    raise ConfigError(KEY, spec, "is this run's own workdir; a stage starts from another run's checkpoint")
  _refuse_live(spec, origin_dir)
  steps = ckpt_lib.finalized_steps(origin_dir)
  if not steps:
    raise ConfigError(KEY, spec, f"{os.path.join(origin_dir, ckpt_lib.CKPT_DIR)} holds no checkpoint")
  if at is not None and at not in steps:
    raise ConfigError(KEY, spec, f"{origin_dir} has no checkpoint at step {at} (it has steps {steps})")
  return Request(spec, origin_dir, at)


def _resumed(spec: str, recorded: dict) -> Request:
  """The recorded step, at the recorded path; if the origin moved, at `spec`'s path (`checkpoint.check_config`
  let a new path through only with allow_config_change), where `load` checks that its params are the same."""
  old, s = recorded["workdir"], recorded["step"]
  if recorded.get("hf"):
    if hf_path(spec) != old:
      raise ConfigError(KEY, spec, f"this run started from hf:{old}; a resumed stage keeps its reference: name it, "
                        "or use a new workdir")
    return Request(spec, old, 0, recorded["params_fingerprint"], hf=True)
  new, at = parse(spec)
  if at is not None and at != s:
    raise ConfigError(KEY, spec, f"this run started from step {s} of its origin; a resumed stage keeps its "
                      f"reference: name step {s}, or use a new workdir")
  where = new if s not in ckpt_lib.finalized_steps(old) and new != old else old
  if s in ckpt_lib.finalized_steps(where):
    return Request(spec, where, s, recorded["params_fingerprint"])
  started = f"this run started from {old} step {s}"
  if where != old:
    raise ConfigError(KEY, spec, f"{started}, and {new} has no checkpoint at step {s} (it has steps "
                      f"{ckpt_lib.finalized_steps(new)}): point train.init_from at the origin's new path, or use a "
                      "new workdir")
  if not os.path.isdir(old):
    raise ConfigError(KEY, spec, f"{started}, and {old} is gone: if it moved, move it back there, or rerun with "
                      "--config.train.init_from=<its new path> --config.checkpoint.allow_config_change=True (its "
                      f"step {s} and params are checked there); else use a new workdir")
  raise ConfigError(KEY, spec, f"{started}, which is gone: its reference would change; restore that checkpoint, "
                    "or use a new workdir")


def _refuse_live(spec: str, origin_dir: str) -> None:
  """A run still training in the origin (it holds its workdir lock) may delete the step this stage
  records (checkpoint rotation), and the stage could never resume: refused, naming the holder."""
  held = lock.WorkdirLock(origin_dir).holder() if os.path.isdir(origin_dir) else None
  if held is not None:
    raise ConfigError(KEY, spec, f"{origin_dir} is still being trained by {lock.describe(held)} "
                      f"({os.path.join(origin_dir, lock.LOCK_FILE)}): its checkpoint rotation may delete the step "
                      "this stage starts from; wait for that run to finish")


def recorded_origin(workdir: str) -> dict | None:
  """The origin recorded in the meta of this run's newest checkpoint whose meta reads, else None."""
  if not ckpt_lib.finalized_steps(workdir):
    return None
  mngr = ckpt_lib.make_manager(workdir, read_only=True)
  try:
    for s in sorted(mngr.all_steps(), reverse=True):
      try:
        return mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"].get("origin")
      except Exception:  # damaged: restore_latest reports and moves it
        continue
    return None
  finally:
    mngr.close()


# ---- tokenizer ---------------------------------------------------------------------------------


def prepare_tokenizer(data_cfg, workdir: str, req: Request):
  """(the origin's tokenizer, save) like `data.prepare_tokenizer`: refuses a setting that conflicts with it."""
  data_cfg = config_lib.section(config_lib.DataConfig, data_cfg, "data.")
  if req.hf:  # its own tokenizer.json (resolve_hf set data.tokenizer to it)
    try:
      tok = tokenizers.load_hf(req.workdir, hf_configs.read(req.workdir))
    except ValueError as e:  # HFError, DataError: one line naming the file
      raise ConfigError(KEY, req.spec, str(e)) from None
    return _saved_or_save(tok, workdir, {"kind": "hf"}, f"hf:{req.workdir}")
  origin_tok_dir = os.path.join(req.workdir, "tokenizer")
  tok, have = tokenizers.load(origin_tok_dir, key=KEY)
  tcfg = data_cfg.tokenizer
  if tcfg.path is not None:
    other, _ = tokenizers.load(os.path.expanduser(tcfg.path))
    if other.fingerprint() != tok.fingerprint():
      raise ConfigError("data.tokenizer.path", tcfg.path, f"is not the origin's tokenizer ({origin_tok_dir}; fingerprint "
                        f"{other.fingerprint()} vs {tok.fingerprint()}); a stage reuses its origin's: unset it")
  else:
    for field, value in tokenizers.spec(tcfg).items():
      if have.get(field, value) != value:
        raise ConfigError(f"data.tokenizer.{field}", value, f"the origin's tokenizer ({origin_tok_dir}) has "
                          f"{field}={have.get(field)!r}; a stage reuses it: set the same")
  return _saved_or_save(tok, workdir, have, origin_tok_dir)


def _saved_or_save(tok, workdir: str, spec: dict, where: str):
  """(the run's saved copy of the origin's tokenizer, no-op), or (`tok`, save it) in a new run."""
  run_dir = os.path.join(workdir, "tokenizer")
  if not os.path.isdir(run_dir):
    return tok, functools.partial(tokenizers.save, tok, run_dir, spec)
  own, _ = tokenizers.load(run_dir, key="workdir")
  if own.fingerprint() != tok.fingerprint():
    raise ConfigError("data.tokenizer", run_dir, f"differs from the origin's tokenizer ({where}); use a new workdir")
  return own, lambda: None


# ---- model and parameters ---------------------------------------------------------------------


def resolved_model(config: dict, vocab_size: int) -> dict:
  """`config['model']` (a config.json-like dict) with its derived values filled in (None = derived)."""
  m = dict(config["model"])
  m["vocab_size"] = m.get("vocab_size") or vocab_size
  m["num_kv_heads"] = m.get("num_kv_heads") or m["num_heads"]
  m["max_len"] = m["max_len"] if m.get("max_len") is not None else config["data"]["context_length"]
  m["mlp_dim"] = config_lib.mlp_dim(ml_collections.ConfigDict(m))
  m["head_dim"] = m.get("head_dim") or m["embed_dim"] // m["num_heads"]
  m["norm_eps"] = config_lib.norm_eps(ml_collections.ConfigDict(m))
  return m


def check_model(saved: dict, current: dict, vocab_size: int, where: str) -> None:
  """Refuses, naming the first differing `model.X`, a model other than the origin's (`where`).
  An origin from before a model key existed had its default (`checkpoint.ADDED_KEYS`)."""
  a, b = resolved_model(ckpt_lib.with_added_keys(saved), vocab_size), resolved_model(current, vocab_size)
  for k in sorted(set(a) | set(b)):
    if k not in FREE_MODEL_KEYS and a.get(k, "<absent>") != b.get(k, "<absent>"):
      raise ConfigError(f"model.{k}", b.get(k, "<absent>"),
                        f"the origin ({where}) has {a.get(k, '<absent>')!r}; a stage keeps its origin's model")


def load(req: Request, raw_config, abstract_params, tokenizer) -> tuple[Origin, dict]:
  """(Origin, params on `abstract_params`' shardings) of the requested checkpoint, after the tokenizer and
  model checks."""
  if req.hf:
    return _import_hf(req, raw_config, abstract_params, tokenizer)
  steps = [req.step] if req.step is not None else sorted(ckpt_lib.finalized_steps(req.workdir), reverse=True)
  for s in steps:
    try:
      got, params = _restore(req, s, raw_config, abstract_params, tokenizer)
      return _checked(req, got, params)
    except ConfigError:
      raise
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
      if req.step is not None:
        _gone(req, e)
      ckpt_lib.warn(f"{KEY}: checkpoint at step {s} of {req.workdir} is unreadable ({type(e).__name__}); "
                    "trying the previous one")
  raise ConfigError(KEY, req.spec, f"{req.workdir} has no readable checkpoint")


def _restore(req: Request, s: int, raw_config, abstract_params, tokenizer):
  mngr = ckpt_lib.make_manager(req.workdir, read_only=True)
  try:
    saved = mngr.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  finally:
    mngr.close()
  _check_tokenizer(req, s, saved["meta"], tokenizer)  # first: another vocabulary's embedding would not even restore
  check_model(saved["config"], ckpt_lib.config_json(raw_config), tokenizer.vocab_size, f"{req.workdir} step {s}")
  got, params, _, _ = ckpt_lib.restore_params(req.workdir, s, _held_by(saved["config"], abstract_params))
  return got, params


def _import_hf(req: Request, raw_config, abstract_params, tokenizer) -> tuple[Origin, dict]:
  """The HF directory's params on the stage's shardings (all but a score head it lacks), as step 0."""
  from lmobjective.model import ModelConfig
  cfg = config_lib.typed(raw_config)
  model_cfg = ModelConfig.from_config(cfg.model, tokenizer.vocab_size, cfg.data.context_length)
  held = {k: v for k, v in abstract_params.items() if k != "score_head"}
  try:
    params = hf_load.load(req.workdir, hf_configs.read(req.workdir), model_cfg, held)
  except hf_configs.HFError as e:
    raise ConfigError(KEY, req.spec, str(e)) from None
  origin = Origin(req.workdir, 0, params_fingerprint(params), hf=True)
  if req.fingerprint is not None and origin.params_fingerprint != req.fingerprint:
    raise ConfigError(KEY, req.spec, f"this run started from hf:{req.workdir} with params sha256 {req.fingerprint}, "
                      f"which now has {origin.params_fingerprint}: its reference would change; restore those "
                      "weights, or use a new workdir")
  return origin, params


def _held_by(origin_config: dict, abstract_params: dict) -> dict:
  """The part of the stage's params the origin holds: all but a score head its objective has no use for
  (`start_state` initialises it)."""
  kind = config_lib.with_added_keys(origin_config)["objective"]["kind"]
  if objectives.OBJECTIVES[kind].scored:
    return abstract_params
  return {k: v for k, v in abstract_params.items() if k != "score_head"}


def _check_tokenizer(req: Request, s: int, meta: dict, tokenizer) -> None:
  """The origin's tokenizer/ directory holds the tokenizer its checkpoints recorded (it may have been replaced)."""
  trained_with = meta["tokenizer"]["fingerprint"]
  if trained_with != tokenizer.fingerprint():
    where = os.path.join(req.workdir, "tokenizer")
    raise ConfigError(KEY, req.spec, f"{where} is not the tokenizer its checkpoints were trained with (fingerprint "
                      f"{tokenizer.fingerprint()}; the checkpoint at step {s} records {trained_with}): put that "
                      f"tokenizer back in {where}")


def _checked(req: Request, s: int, params) -> tuple[Origin, dict]:
  origin = Origin(req.workdir, s, params_fingerprint(params))
  if req.fingerprint is not None and origin.params_fingerprint != req.fingerprint:
    raise ConfigError(KEY, req.spec, f"this run started from {req.workdir} step {s} with params sha256 "
                      f"{req.fingerprint}, which now has {origin.params_fingerprint}: its reference would "
                      "change; restore that checkpoint, or use a new workdir")
  return origin, params


def _gone(req: Request, e: Exception):
  started = "this run started from it" if req.fingerprint is not None else "the requested step"
  raise ConfigError(KEY, req.spec, f"cannot read {req.workdir} step {req.step} ({started}; {type(e).__name__}): "
                    "restore that checkpoint, or use a new workdir") from None


# ---- the step-0 state ---------------------------------------------------------------------------


def start_state(tx, key: jax.Array, params, init_params=None) -> step.TrainState:
  """Step 0 from `params`: a copy (the train step donates its state; the reference keeps its buffers),
  a fresh optimizer state, and the dropout rng `step.init_state` derives from `key`. A head the origin
  lacks (a reward model's score head on a language model) comes from `init_params(init_rng)`, the
  model's own initialisation; the origin's params replace the rest."""
  init_rng, dropout_rng = jax.random.split(key)
  params = jax.tree.map(jnp.copy, params)
  if init_params is not None:
    fresh = init_params(init_rng)
    if set(fresh) - set(params):
      params = {**{k: v for k, v in fresh.items() if k not in params}, **params}
  return step.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=dropout_rng)


class SeededInit:
  """`program(key, params)` with the origin's params bound: the `(key) -> state` interface of `Experiment.init_fn`."""

  def __init__(self, program, params):
    self.program, self.params, self.mesh = program, params, program.mesh

  def __call__(self, key):
    return self.program(key, self.params)

  def eval_shape(self, key):
    return self.program.eval_shape(key, self.params)

  def lower(self, key):
    return self.program.lower(key, self.params)

  def compile(self, key):
    return self.program.compile(key, self.params)

  @property
  def executables(self) -> list:
    return self.program.executables
