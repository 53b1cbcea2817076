"""The one config validator: `validate(config)` checks every key of every section, in one place.

Every entry point calls it before anything is built or written: `train.run`, sweep planning
(every planned run), tokenizer training, and `restore` (so `evaluate` and notebooks) on the
checkpoint's config. A bad value is one `ConfigError` line naming the key and what is allowed.
Then `config.typed(config)` turns the ConfigDict into the frozen dataclasses library code reads.
"""

from __future__ import annotations

import ml_collections

from lmobjective.config import (ConfigError, decay_steps, get, max_len, mlp_dim, require_choice, require_float,
                                require_int, wsd_decay_steps)
from lmobjective import config as config_lib
from lmobjective import objectives
from lmobjective.data import mixture, sources, stdlib_corpus


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` (one line, naming the key) for the first bad value; returns None if all are good."""
  _validate_core(config)
  _validate_checkpoint(config)
  _validate_distributed(config)
  _validate_data(config)


def _validate_checkpoint(cfg) -> None:
  require_int(cfg, "checkpoint.every_steps", 0)  # 0 = only at the end and on SIGTERM/SIGINT
  require_int(cfg, "checkpoint.keep", 1)
  require_choice(cfg, "train.nan_policy", ("stop", "skip"))
  require_float(cfg, "train.max_skipped_fraction", 0.0, 1.0)
  require_int(cfg, "train.dead_grad_steps", 1)
  require_float(cfg, "train.max_param_growth", 1.0, lo_open=True)


def _validate_distributed(cfg) -> None:
  d = cfg.distributed
  explicit = (d.coordinator_address, d.num_processes, d.process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ConfigError("distributed", explicit,
                      "set coordinator_address, num_processes and process_id together (or none)")
  if d.num_processes is not None and not 0 <= d.process_id < d.num_processes:
    raise ConfigError("distributed.process_id", d.process_id,
                      f"must be in [0, num_processes={d.num_processes})")
  if d.coordinator_address is not None and d.auto_detect:
    raise ConfigError("distributed.auto_detect", True, "conflicts with an explicit coordinator_address")


def _validate_core(cfg) -> None:
  require_int(cfg, "seed", 0)
  require_int(cfg, "train.steps", 0)
  require_int(cfg, "train.batch_size", 1)
  require_int(cfg, "train.grad_accum_steps", 1)
  if cfg.train.batch_size % cfg.train.grad_accum_steps:
    raise ConfigError("train.grad_accum_steps", cfg.train.grad_accum_steps,
                      f"must divide train.batch_size={cfg.train.batch_size}")
  require_int(cfg, "train.log_every_steps", 1)
  _validate_model(cfg)
  _validate_objective(cfg)
  _validate_optimizer(cfg)
  require_int(cfg, "eval.every_steps", 1)
  require_int(cfg, "eval.num_batches", 0)
  require_int(cfg, "eval.batch_size", 1)
  for axis in ("data", "fsdp", "tensor"):
    v = cfg.mesh[axis]
    if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
      raise ConfigError(f"mesh.{axis}", v, "must be a positive integer or -1 (the rest of the devices)")
  check_mesh_divides(cfg.mesh, sharded_dims(cfg.model))


def _validate_objective(cfg) -> None:
  """The objective checks the keys it reads (`objectives.validate`); here, that its sources hold its examples."""
  objective, kind = objectives.validate(cfg), cfg.objective.kind
  if objective.examples == "prompts" or any(s.kind in sources.PROMPT_KINDS for s in cfg.data.sources.values()):
    _validate_prompt_source(cfg, objective.examples == "prompts")
    return _validate_init_from(cfg)
  _refuse_unread_rl_keys(cfg)
  pairs = objective.examples == "pairs"
  for name, s in cfg.data.sources.items():
    if (s.kind in sources.PAIR_KINDS) != pairs:
      readers = [k for k, o in objectives.OBJECTIVES.items() if o.examples == "pairs"]
      allowed = (f"preference objectives train on kind {' or '.join(sources.PAIR_KINDS)} sources only" if pairs else
                 f"a {s.kind} source needs a preference objective (objective.kind {', '.join(readers[:-1])} "
                 f"or {readers[-1]})")
      raise ConfigError(f"data.sources.{name}.kind", s.kind, f"with objective.kind={kind!r}: {allowed}")
  _validate_init_from(cfg)


def _validate_init_from(cfg) -> None:
  if cfg.train.init_from is not None and (not isinstance(cfg.train.init_from, str) or not cfg.train.init_from):
    raise ConfigError("train.init_from", cfg.train.init_from, "must be WORKDIR or WORKDIR:STEP")


def _prompt_readers() -> list[str]:
  return [k for k, o in objectives.OBJECTIVES.items() if o.examples == "prompts"]


def _refuse_unread_rl_keys(cfg) -> None:
  """An rl.* key set away from its default under an objective that samples nothing would be silently unread."""
  defaults = config_lib.load_config_file(config_lib.DEFAULT_CONFIG).rl
  for key, value in cfg.rl.items():
    if key in defaults and value != defaults[key]:
      raise ConfigError(f"rl.{key}", value, f"objective.kind={cfg.objective.kind!r} samples no responses and would "
                        f"ignore it: rl.* applies to {' or '.join(_prompt_readers())} (default {defaults[key]!r})")


def _validate_prompt_source(cfg, rl: bool) -> None:
  """Reward maximisation samples from exactly one prompts_jsonl source; no other objective reads one."""
  kind = cfg.objective.kind
  for name, s in cfg.data.sources.items():
    if (s.kind in sources.PROMPT_KINDS) != rl:
      allowed = (f"reward maximisation samples from one {sources.PROMPT_KINDS[0]} source" if rl else
                 f"a {s.kind} source needs objective.kind {' or '.join(_prompt_readers())}")
      raise ConfigError(f"data.sources.{name}.kind", s.kind, f"with objective.kind={kind!r}: {allowed}")
  if len(cfg.data.sources) != 1:
    raise ConfigError("data.sources", ", ".join(cfg.data.sources), f"objective.kind={kind!r} samples from one "
                      f"{sources.PROMPT_KINDS[0]} source (its prompts), not {len(cfg.data.sources)}")
  (name, s), = cfg.data.sources.items()
  if s.val_fraction > 0 and cfg.rl.eval_prompts:
    raise ConfigError(f"data.sources.{name}.val_fraction", s.val_fraction, "set it to 0 with rl.eval_prompts: the "
                      "held-out prompts are that file's, and this share of the training prompts would go unused")
  require_int(cfg, "rl.max_new_tokens", 1)
  require_float(cfg, "rl.temperature", 0.0, lo_open=True)
  require_int(cfg, "rl.top_k", 0)
  require_float(cfg, "rl.top_p", 0.0, 1.0, lo_open=True)
  require_int(cfg, "rl.epochs", 1)
  require_int(cfg, "rl.num_minibatches", 1)
  if cfg.train.batch_size % cfg.rl.num_minibatches:
    raise ConfigError("rl.num_minibatches", cfg.rl.num_minibatches, f"must divide train.batch_size="
                      f"{cfg.train.batch_size} (each minibatch holds whole groups of prompts)")
  require_float(cfg, "rl.missing_eos_penalty", 0.0)
  _require_bool(cfg, "rl.mask_truncated_completions")
  if cfg.rl.reward_model is not None and (not isinstance(cfg.rl.reward_model, str) or not cfg.rl.reward_model.strip()):
    raise ConfigError("rl.reward_model", cfg.rl.reward_model, "must be a reward model's workdir, or None")
  if not isinstance(cfg.rl.reward_fn, str) or (not cfg.rl.reward_fn.strip() and cfg.rl.reward_model is None):
    raise ConfigError("rl.reward_fn", cfg.rl.reward_fn, "name at least one reward: \"path/to/file.py:function\" or "
                      "\"package.module:function\" (comma-separated for several), or set rl.reward_model")
  require_int(cfg, "rl.eval_samples", 1)
  if cfg.rl.max_new_tokens >= cfg.data.context_length:
    raise ConfigError("rl.max_new_tokens", cfg.rl.max_new_tokens, f"must be < data.context_length="
                      f"{cfg.data.context_length} (a row holds the prompt and the response)")


# The model dimensions each mesh axis splits (sharding.RULES): each must be a multiple of its size.
SPLIT_DIMS = {"tensor": ("num_heads", "num_kv_heads", "mlp_dim", "vocab_size"), "fsdp": ("embed_dim",)}


def sharded_dims(model, vocab_size: int | None = None) -> dict[str, int | None]:
  """`config.model`'s sizes that the mesh splits, resolved (vocab_size None: the tokenizer's, not known yet)."""
  return {"num_heads": model.num_heads, "num_kv_heads": model.num_kv_heads or model.num_heads,
          "mlp_dim": mlp_dim(model), "vocab_size": model.vocab_size or vocab_size, "embed_dim": model.embed_dim}


def check_mesh_divides(mesh_sizes, dims: dict[str, int | None]) -> None:
  """Each split dimension is a multiple of its mesh axis; `mesh_sizes[axis]` -1 = not resolved yet."""
  for axis, names in SPLIT_DIMS.items():
    size = mesh_sizes[axis]
    for name in names:
      if size > 1 and dims[name] is not None and dims[name] % size:
        raise ConfigError(f"mesh.{axis}", size, f"must divide model.{name}={dims[name]} (the model splits it "
                          f"over mesh.{axis})")


MLPS = ("swiglu", "gelu", "relu2")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "linear", "constant", "wsd")


def _validate_model(cfg) -> None:
  m = cfg.model
  require_int(cfg, "model.num_layers", 1)
  require_int(cfg, "model.num_heads", 1)
  require_int(cfg, "model.embed_dim", 1)
  require_int(cfg, "model.head_dim", 1, allow_none=True)
  if m.head_dim is None and m.embed_dim % m.num_heads:
    raise ConfigError("model.embed_dim", m.embed_dim, f"must be divisible by model.num_heads={m.num_heads} "
                      "(or set model.head_dim)")
  head_dim = m.head_dim or m.embed_dim // m.num_heads
  if m.position == "rope" and head_dim % 2:
    raise ConfigError("model.head_dim" if m.head_dim else "model.embed_dim", m.head_dim or m.embed_dim,
                      f"the head dimension {head_dim} must be even for rope positions")
  require_int(cfg, "model.num_kv_heads", 1, allow_none=True)
  if m.num_kv_heads is not None and m.num_heads % m.num_kv_heads:
    raise ConfigError("model.num_kv_heads", m.num_kv_heads, f"must divide model.num_heads={m.num_heads}")
  require_int(cfg, "model.mlp_dim", 1, allow_none=True)
  require_int(cfg, "model.max_len", 1, allow_none=True)
  require_int(cfg, "model.vocab_size", 2, allow_none=True)
  require_choice(cfg, "model.position", ("rope", "learned"))
  require_float(cfg, "model.rope_theta", 0.0, lo_open=True)
  require_choice(cfg, "model.norm", ("rmsnorm", "layernorm"))
  if m.norm_eps is not None:
    require_float(cfg, "model.norm_eps", 0.0, lo_open=True)
  require_choice(cfg, "model.attention_bias", ("none", "qkv", "qkvo"))
  _require_bool(cfg, "model.mlp_bias")
  require_choice(cfg, "model.mlp", MLPS)
  _require_bool(cfg, "model.qk_norm")
  require_float(cfg, "model.dropout", 0.0, 1.0)
  if m.dropout == 1.0:
    raise ConfigError("model.dropout", m.dropout, "must be in [0, 1)")
  require_float(cfg, "model.init_std", 0.0, lo_open=True)
  require_choice(cfg, "model.param_dtype", ("float32", "bfloat16"))
  require_choice(cfg, "model.compute_dtype", ("float32", "bfloat16"))
  require_choice(cfg, "model.attention", ("auto", "xla", "cudnn"))
  require_choice(cfg, "model.remat", ("none", "full", "dots_saveable"))


def _validate_optimizer(cfg) -> None:
  o = cfg.optimizer
  require_choice(cfg, "optimizer.kind", OPTIMIZERS)
  require_float(cfg, "optimizer.learning_rate", 0.0)
  require_float(cfg, "optimizer.end_learning_rate", 0.0)
  require_choice(cfg, "optimizer.schedule", SCHEDULES)
  require_int(cfg, "optimizer.warmup_steps", 0)
  require_int(cfg, "optimizer.decay_steps", 0, allow_none=True)
  decay = decay_steps(cfg, objectives.updates_per_step(cfg))
  if decay < o.warmup_steps:
    raise ConfigError("optimizer.decay_steps" if o.decay_steps is not None else "train.steps",
                      decay, f"must be >= optimizer.warmup_steps={o.warmup_steps} (it includes warmup)")
  require_float(cfg, "optimizer.decay_fraction", 0.0, 1.0)
  cooldown = wsd_decay_steps(o.decay_fraction, decay)
  if o.schedule == "wsd" and o.warmup_steps + cooldown > decay:
    raise ConfigError("optimizer.decay_fraction", o.decay_fraction,
                      f"its {cooldown} decay steps and optimizer.warmup_steps={o.warmup_steps} exceed the "
                      f"{decay} steps of warmup+decay")
  require_float(cfg, "optimizer.b1", 0.0, 1.0)
  require_float(cfg, "optimizer.b2", 0.0, 1.0)
  require_float(cfg, "optimizer.eps", 0.0)
  require_float(cfg, "optimizer.weight_decay", 0.0)
  require_float(cfg, "optimizer.grad_clip", 0.0)
  require_float(cfg, "optimizer.muon_learning_rate", 0.0)
  require_float(cfg, "optimizer.muon_weight_decay", 0.0)
  require_float(cfg, "optimizer.muon_momentum", 0.0, 1.0)
  if o.muon_momentum == 1.0:
    raise ConfigError("optimizer.muon_momentum", o.muon_momentum, "must be in [0, 1)")


TOKENIZER_KINDS = ("sentencepiece", "char", "byte", "hf")
PACKINGS = ("concat", "window")


def _require_bool(cfg, key: str) -> None:
  if not isinstance(get(cfg, key), bool):
    raise ConfigError(key, get(cfg, key), "must be True or False")


def _validate_data(cfg) -> None:
  require_int(cfg, "data.context_length", 1)
  if cfg.data.context_length > max_len(cfg):
    raise ConfigError("data.context_length", cfg.data.context_length,
                      f"must be <= model.max_len={max_len(cfg)} (the longest context the model supports)")
  require_choice(cfg, "data.packing", PACKINGS)
  _require_bool(cfg, "data.document_masking")
  if cfg.data.cache_dir is not None and not isinstance(cfg.data.cache_dir, str):
    raise ConfigError("data.cache_dir", cfg.data.cache_dir, "must be a directory path or None")
  _validate_tokenizer(cfg)
  if not len(cfg.data.sources):
    raise ConfigError("data.sources", {}, "must name at least one source")
  for name in cfg.data.sources:
    _validate_source(cfg, name)
  mixture.normalise({n: s.weight for n, s in cfg.data.sources.items()})
  mixture.parse_stages(cfg.data.mixture_stages, tuple(cfg.data.sources.keys()))


def _validate_tokenizer(cfg) -> None:
  require_choice(cfg, "data.tokenizer.kind", TOKENIZER_KINDS)
  require_choice(cfg, "data.tokenizer.model_type", ("bpe", "unigram"))
  if cfg.data.tokenizer.kind == "sentencepiece" and cfg.data.tokenizer.path is None:
    require_int(cfg, "data.tokenizer.vocab_size", 300, 1 << 20)
  if cfg.data.tokenizer.kind == "hf" and cfg.data.tokenizer.path is None:
    raise ConfigError("data.tokenizer.path", None, "required for kind=hf: a directory with a Hugging Face "
                      "tokenizer.json (and config.json, which names BOS and EOS)")
  require_int(cfg, "data.tokenizer.sample_lines", 1)
  require_int(cfg, "data.tokenizer.seed", 0)


def _validate_source(cfg, name: str) -> None:
  p = f"data.sources.{name}"
  if not name.isidentifier():
    raise ConfigError(p, name, "source names must be identifiers")
  s = cfg.data.sources[name]
  require_choice(cfg, f"{p}.kind", sources.KINDS)
  require_float(cfg, f"{p}.weight", 0.0)
  require_float(cfg, f"{p}.val_fraction", 0.0, 0.5)
  require_int(cfg, f"{p}.max_documents", 1, allow_none=True)
  if s.kind in sources.FILE_KINDS and not s.path:
    raise ConfigError(f"{p}.path", s.path, f"required for kind={s.kind}")
  if s.kind == "markov":
    require_int(cfg, f"{p}.markov.order", 1, 8)
    require_int(cfg, f"{p}.markov.num_symbols", 2, 94)
    if s.markov.num_symbols ** s.markov.order > 1 << 20:
      raise ConfigError(f"{p}.markov.order", s.markov.order, "num_symbols**order must be <= 2**20 states")
    require_float(cfg, f"{p}.markov.concentration", 0.0, lo_open=True)
    require_int(cfg, f"{p}.markov.seed", 0)
    require_int(cfg, f"{p}.markov.num_documents", 2)
    require_int(cfg, f"{p}.markov.document_length", 1)
  _require_bool(cfg, f"{p}.only_train_on_assistant")
  require_int(cfg, f"{p}.max_prompt_length", 1, allow_none=True)
  require_int(cfg, f"{p}.max_response_length", 1, allow_none=True)
  _validate_exclude_modules(s, p)
  if s.kind in sources.PAIR_KINDS and (s.max_prompt_length or 0) > cfg.data.context_length:
    raise ConfigError(f"{p}.max_prompt_length", s.max_prompt_length, f"must be <= data.context_length="
                      f"{cfg.data.context_length}, so a response token is still a target in a row of context_length+1")


def _validate_exclude_modules(s, p: str) -> None:
  if not isinstance(s.exclude_modules, str):
    raise ConfigError(f"{p}.exclude_modules", s.exclude_modules, "must be a comma-separated string of module names")
  if s.exclude_modules.strip() and s.kind not in sources.EXCLUDING_KINDS:
    raise ConfigError(f"{p}.exclude_modules", s.exclude_modules,
                      f"applies to kind {' or '.join(sources.EXCLUDING_KINDS)}, not {s.kind!r}")
  stdlib_corpus.parse_modules(f"{p}.exclude_modules", s.exclude_modules)
