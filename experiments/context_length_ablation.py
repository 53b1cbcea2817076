"""Context-length ablation at an equal token budget: 64, 128, 256, 512 tokens of context.

  python -m lmobjective.sweep --sweep=experiments/context_length_ablation.py --workdir=runs/context
  python -m lmobjective.sweep --sweep=experiments/context_length_ablation.py:quick --workdir=runs/context_quick

Every run sees the same tokens per step, batch_size x context_length = 4096 (the default's 32 x 128),
and the same number of steps, hence the same token budget and the same learning-rate schedule:
only how the tokens are cut into rows changes. model.max_len follows data.context_length (a
FieldReference in configs/default.py), and eval.batch_size follows train.batch_size, so every
run is also evaluated on the same number of validation tokens. Each run writes
val_loss_by_position.json (mean -log p at context position t), plotted in loss_by_position.png.
`quick`: a 2-layer, 128-wide model, 150 steps (614k tokens per run; ~1 min per run on 2 CPU cores).
"""

TOKENS_PER_STEP = 4096
CONTEXT_LENGTHS = (64, 128, 256, 512)

QUICK = {"train.steps": 150, "optimizer.warmup_steps": 15, "model.num_layers": 2, "model.embed_dim": 128,
         "data.tokenizer.vocab_size": 1024, "data.tokenizer.sample_lines": 20_000, "eval.every_steps": 50,
         "eval.num_batches": 2}


def get_sweep(arg=None):
  runs = {f"ctx{t}": {"data.context_length": t, "train.batch_size": TOKENS_PER_STEP // t} for t in CONTEXT_LENGTHS}
  return {"config": "configs/default.py", "overrides": QUICK if arg == "quick" else {}, "runs": runs,
          "description": f"Equal token budget: batch_size x context_length = {TOKENS_PER_STEP} tokens per step, "
                         "same steps for every run."}
