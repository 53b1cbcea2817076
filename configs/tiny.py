"""Tiny preset for tests and quick looks: the default experiment, shrunk. Keys come from default.py."""

from lmobjective.config import base_config


def get_config(arg: str | None = None):
  c = base_config(__file__, arg=arg)
  c.data.context_length = 32
  c.data.tokenizer.vocab_size = 512
  c.data.tokenizer.sample_lines = 5_000
  for name in c.data.sources:
    c.data.sources[name].max_documents = 200
  c.data.sources.markov.markov.num_documents = 200
  c.data.sources.markov.markov.document_length = 300
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.embed_dim = 64
  c.train.steps = 20
  c.train.batch_size = 8
  c.train.log_every_steps = 1
  c.optimizer.warmup_steps = 2
  c.eval.every_steps = 10
  c.eval.num_batches = 1
  c.eval.batch_size = 8
  c.checkpoint.every_steps = 10
  return c
