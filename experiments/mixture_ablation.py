"""Mixture ablation: 8 token-share mixtures of the default sources (code, prose, markov).

  python -m lmobjective.sweep --sweep=experiments/mixture_ablation.py --workdir=runs/mixture
  python -m lmobjective.sweep --sweep=experiments/mixture_ablation.py:quick --workdir=runs/mixture_quick
  python -m lmobjective.mixture_regression --workdir=runs/mixture_quick [--verify]

The design spreads points over the simplex with every weight >= 0.1 (so each source's loss is
measured, not extrapolated from zero): the default 0.6/0.3/0.1, the centre, three corners-ish
(0.8/0.1/0.1 and rotations) and three edge midpoints (0.45/0.45/0.1 and rotations). Eight runs
give the 4-parameter-per-source mixture law of lmobjective.sweep.mixture_regression 4 degrees of freedom.
All runs share one tokenizer (trained by the sweep on the base config's default mixture).
`quick`: a 2-layer, 128-wide model, 200 steps of 16 x 64 tokens (~1 min per run on 2 CPU cores).
"""

MIXTURES = [(0.6, 0.3, 0.1), (1 / 3, 1 / 3, 1 / 3), (0.8, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.1, 0.8),
            (0.45, 0.45, 0.1), (0.45, 0.1, 0.45), (0.1, 0.45, 0.45)]
SOURCES = ("code", "prose", "markov")

QUICK = {"data.context_length": 64, "train.batch_size": 16, "train.steps": 200, "optimizer.warmup_steps": 20,
         "model.num_layers": 2, "model.embed_dim": 128, "data.tokenizer.vocab_size": 1024,
         "data.tokenizer.sample_lines": 20_000, "eval.every_steps": 50, "eval.num_batches": 4}


def get_sweep(arg=None):
  runs = {"-".join(f"{s}{round(100 * w)}" for s, w in zip(SOURCES, mix)):
          {f"data.sources.{s}.weight": round(w, 4) for s, w in zip(SOURCES, mix)} for mix in MIXTURES}
  return {"config": "configs/default.py", "overrides": QUICK if arg == "quick" else {}, "runs": runs,
          "description": "Per-source val loss against the token share of each source (code, prose, markov)."}
