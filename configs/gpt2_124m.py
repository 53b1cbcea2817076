"""GPT-2 small (124M) shape: 12 layers, 12 heads, 768 wide, T=1024, learned positions, LayerNorm,
GELU MLP with biases, tied embeddings, vocabulary padded to 50,304 (nanoGPT). bf16 compute."""

from lmobjective.config import base_config


def get_config(arg: str | None = None):
  c = base_config(__file__, arg=arg)
  c.data.context_length = 1024
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.embed_dim = 768
  c.model.vocab_size = 50_304
  c.model.position = "learned"
  c.model.norm = "layernorm"
  c.model.mlp = "gelu"
  c.model.use_bias = True
  c.model.tie_embeddings = True
  c.model.compute_dtype = "bfloat16"
  c.data.tokenizer.vocab_size = 32_000
  c.train.batch_size = 32
  c.train.steps = 5_000
  c.optimizer.learning_rate = 6e-4
  c.optimizer.end_learning_rate = 6e-5
  c.optimizer.warmup_steps = 200
  c.eval.every_steps = 500
  c.eval.num_batches = 20
  c.checkpoint.every_steps = 1_000
  return c
