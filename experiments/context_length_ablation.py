"""Context-length ablation at an equal token budget: 64, 128, 256, 512 tokens of context.

  python -m lmobjective.sweep --sweep=experiments/context_length_ablation.py --workdir=runs/context
  python -m lmobjective.sweep --sweep=experiments/context_length_ablation.py:quick --workdir=runs/context_quick

Every run sees the same tokens per step, batch_size x context_length = 2048 (e.g. 16 x 128),
and the same number of steps, hence the same token budget and the same learning-rate schedule:
only how the tokens are cut into rows changes. model.max_len is unset, so the model supports
exactly each run's data.context_length. Evaluation is held equal too: eval.batch_size x
context_length = 4096 tokens per eval batch, the leading ~4k tokens of each validation split, so
every run is scored on the same validation text. Each run writes val_loss_by_position.json (mean
-log p at context position t over that text), plotted in loss_by_position.png.
`quick`: a 2-layer, 128-wide model, 300 steps (614k tokens per run; 2-3 min per run on 2 busy CPU cores).
"""

TOKENS_PER_STEP = 2048
EVAL_TOKENS_PER_BATCH = 4096
CONTEXT_LENGTHS = (64, 128, 256, 512)

QUICK = {"train.steps": 300, "optimizer.warmup_steps": 30, "model.num_layers": 2, "model.embed_dim": 128,
         "data.tokenizer.vocab_size": 1024, "data.tokenizer.sample_lines": 20_000, "eval.every_steps": 100,
         "eval.num_batches": 2}


def get_sweep(arg=None):
  runs = {f"ctx{t}": {"data.context_length": t, "train.batch_size": TOKENS_PER_STEP // t,
                      "eval.batch_size": EVAL_TOKENS_PER_BATCH // t} for t in CONTEXT_LENGTHS}
  return {"config": "configs/default.py", "overrides": QUICK if arg == "quick" else {}, "runs": runs,
          "description": f"Equal token budget: batch_size x context_length = {TOKENS_PER_STEP} tokens per step, "
                         f"same steps for every run; {EVAL_TOKENS_PER_BATCH} validation tokens per eval batch."}
