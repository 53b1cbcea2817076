"""Character-level training on one text file, tuned for the wall-clock time to a target val loss on 2 CPU cores.

    python -m lmobjective.train --config=configs/char_fast.py --workdir=runs/char \\
      --config.data.sources.text.path=FILE

`char_fast.py:nanogpt` is nanoGPT's README CPU run (`train_shakespeare_char` with `--block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0`), hyper-parameter for hyper-parameter: the like-for-like row of
`experiments/bench_time_to_loss.py`, which measures both against nanoGPT on the same machine.

The file's last `val_fraction` (cut at a line break) is the validation text; training reads random
windows of the rest (`packing = window`, as nanoGPT's get_batch does).
"""

import ml_collections

from lmobjective.config import base_config


def _nanogpt(c):
  """nanoGPT's train_shakespeare_char.py with the README's CPU overrides."""
  c.data.context_length = 64
  c.model.num_layers, c.model.num_heads, c.model.embed_dim = 4, 4, 128
  c.model.position, c.model.norm, c.model.mlp = "learned", "layernorm", "gelu"
  c.model.use_bias, c.model.tie_embeddings, c.model.dropout = False, True, 0.0
  c.train.steps, c.train.batch_size = 2000, 12
  c.optimizer.learning_rate, c.optimizer.end_learning_rate = 1e-3, 1e-4
  c.optimizer.schedule, c.optimizer.warmup_steps = "cosine", 100
  c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay, c.optimizer.grad_clip = 0.9, 0.99, 0.1, 1.0
  c.optimizer.decay_embeddings = True  # nanoGPT decays every parameter with 2+ dims, wte and wpe included
  c.eval.every_steps, c.eval.num_batches, c.eval.batch_size = 250, 20, 12  # eval_interval, eval_iters
  c.checkpoint.every_steps = 250  # nanoGPT's always_save_checkpoint: one per evaluation
  return c


def _fast(c):
  """The recipe that reached nanoGPT's loss soonest on 2 CPU cores (experiments/bench_time_to_loss.py;
  each change's effect in docs/benchmarks.md): a 2-layer model of nanoGPT's width (nanoGPT: 4) with
  RoPE, RMSNorm and QK-norm (nanoGPT: learned positions, LayerNorm), Muon for the hidden matrices,
  32 rows a step (nanoGPT: 12) for 250 steps (nanoGPT: 2000), one XLA device (the benchmark's default)."""
  c = _nanogpt(c)
  c.model.num_layers = 2
  c.model.position, c.model.norm, c.model.qk_norm = "rope", "rmsnorm", True
  c.train.steps, c.train.batch_size = 250, 32
  c.optimizer.kind, c.optimizer.muon_learning_rate = "muon", 0.05
  c.optimizer.learning_rate, c.optimizer.end_learning_rate = 4e-3, 4e-4  # the AdamW group: embeddings, norms
  c.optimizer.warmup_steps, c.optimizer.b2 = 40, 0.95
  c.eval.every_steps, c.eval.num_batches = 25, 8
  c.checkpoint.every_steps = 25
  return c


def get_config(arg: str | None = None):
  if arg not in (None, "", "nanogpt"):
    raise ValueError(f"configs/char_fast.py:{arg}: expected no argument or 'nanogpt'")
  c = base_config(__file__)
  c.data.tokenizer.kind = "char"
  c.data.packing, c.data.document_masking = "window", False
  text = c.data.sources.code
  text.kind, text.weight, text.val_fraction = "text", 1.0, 0.1
  c.data.sources = ml_collections.ConfigDict({"text": text})
  c.train.log_every_steps = 10
  c.checkpoint.keep = 1000  # every evaluation's checkpoint stays: the benchmark scores each
  return _nanogpt(c) if arg == "nanogpt" else _fast(c)
