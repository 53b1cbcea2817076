"""Annealing ablation: the last 20% of training on a mixture tilted towards one source.

  python -m lmobjective.sweep --sweep=experiments/anneal_ablation.py --workdir=runs/anneal
  python -m lmobjective.sweep --sweep=experiments/anneal_ablation.py:quick --workdir=runs/anneal_quick

Every run trains on the default mixture (code 0.6, prose 0.3, markov 0.1) for the first 80% of its
steps; `none` keeps it to the end, `anneal_<source>` switches to 0.7 of that source and 0.15 of
each other (`data.mixture_stages`). The first 80% of the steps see exactly the same batches in every
run, so the per-source val losses at the end isolate what the late switch does; the 0.15 floor keeps
every source's loss measured. All runs share one tokenizer (trained by the sweep on the base mixture).
`quick`: a 2-layer, 128-wide model, 200 steps of 16 x 64 tokens (~20 s per run on 2 CPU cores).
"""

SOURCES = ("code", "prose", "markov")
QUICK = {"data.context_length": 64, "train.batch_size": 16, "train.steps": 200, "optimizer.warmup_steps": 20,
         "model.num_layers": 2, "model.embed_dim": 128, "data.tokenizer.vocab_size": 1024,
         "data.tokenizer.sample_lines": 20_000, "eval.every_steps": 40, "eval.num_batches": 4}
FULL_STEPS = 600  # configs/default.py's train.steps


def stage(at: int, tilted: str) -> str:
  return f"{at}:" + ",".join(f"{s}={0.7 if s == tilted else 0.15}" for s in SOURCES)


def get_sweep(arg=None):
  steps = QUICK["train.steps"] if arg == "quick" else FULL_STEPS
  at = int(0.8 * steps)
  runs = {"none": {}} | {f"anneal_{s}": {"data.mixture_stages": stage(at, s)} for s in SOURCES}
  return {"config": "configs/default.py", "overrides": QUICK if arg == "quick" else {}, "runs": runs,
          "description": f"Per-source val loss after annealing the last 20% (from step {at}) on one source."}
