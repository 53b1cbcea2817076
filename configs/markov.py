"""How close does a model get to the entropy floor? One seeded first-order Markov source, a byte
tokenizer (one symbol = one byte = one token), so val loss compares directly with the chain's exact
entropy rate (printed in the run header and in pipe.stats()).

    python -m lmobjective.train --config=configs/markov.py --workdir=runs/markov
"""

import ml_collections

from lmobjective.config import base_config


def get_config(arg: str | None = None):
  c = base_config(__file__, arg=arg)
  markov = c.data.sources.markov
  markov.weight = 1.0
  markov.markov.num_documents = 400
  c.data.sources = ml_collections.ConfigDict({"markov": markov})
  c.data.tokenizer.kind = "byte"
  c.data.context_length = 64
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.embed_dim = 64
  c.train.steps = 150
  c.train.batch_size = 16
  c.train.log_every_steps = 10
  c.optimizer.learning_rate = 1e-2
  c.optimizer.end_learning_rate = 1e-3
  c.optimizer.warmup_steps = 10
  c.eval.every_steps = 50
  c.eval.num_batches = 8
  return c
