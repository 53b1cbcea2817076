"""`validate(cfg)`: every `cfg.data.*` key (and context_length vs model.max_len), one line per error."""

from __future__ import annotations

from lmobjective.config import ConfigError, get, max_len, require_choice, require_float, require_int
from lmobjective.data import mixture, sources

TOKENIZER_KINDS = ("sentencepiece", "char", "byte")
PACKINGS = ("concat", "window")


def _require_bool(cfg, key: str) -> None:
  if not isinstance(get(cfg, key), bool):
    raise ConfigError(key, get(cfg, key), "must be True or False")


def validate(cfg) -> None:
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
