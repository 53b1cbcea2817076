"""Data: offline sources, tokenizers, pre-tokenization cache, packing and a seeded token-share mixture.

  tok = data.build_tokenizer(cfg.data, workdir)
  pipe = data.build_pipeline(cfg.data, tok, seed=cfg.seed, batch_size=B)   # B = rows per process
  it = pipe.train_iterator(); batch = next(it)
"""

from lmobjective.data.errors import DataError, DataWarning
from lmobjective.data.pipeline import FIELDS, Pipeline, build_pipeline
from lmobjective.data.tokenizer_build import build_tokenizer, prepare_tokenizer
from lmobjective.data.tokenizers import Tokenizer

__all__ = ["DataError", "DataWarning", "FIELDS", "Pipeline", "Tokenizer", "build_pipeline", "build_tokenizer",
           "prepare_tokenizer"]
