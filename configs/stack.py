"""The objective stack on offline data: pretrain -> SFT -> DPO, each stage from the one before.

    python -m lmobjective.train --config=configs/stack.py:pretrain --workdir=runs/stack/pretrained
    python -m lmobjective.train --config=configs/stack.py:sft --workdir=runs/stack/sft \\
      --config.train.init_from=runs/stack/pretrained
    python -m lmobjective.train --config=configs/stack.py:dpo --workdir=runs/stack/dpo \\
      --config.train.init_from=runs/stack/sft

(`experiments/objective_stack.sh WORKDIR` runs the three and prints the table.) Append ",quick" to
the stage (`stack.py:sft,quick`) for the CPU setting the script uses by default.

The SFT conversations and the preference pairs are built from the standard library
(`data/stdlib_tasks.py`: the user asks what a function does, the assistant answers with its
docstring's summary). A share HELD_OUT of the stdlib modules is held out: their functions are the
validation conversations and pairs, and pretraining's `code` and `prose` leave those modules out,
so no stage has trained on a held-out docstring.
"""

from lmobjective.config import base_config
from lmobjective.data import stdlib_tasks

HELD_OUT = 0.1  # share of stdlib modules held out (by a hash of their name)
QUICK_STEPS = {"pretrain": 400, "sft": 200, "dpo": 300}


def get_config(arg: str = "pretrain"):
  stage, _, size = arg.partition(",")
  if stage not in ("pretrain", "sft", "dpo") or size not in ("", "quick"):
    raise ValueError(f"configs/stack.py:{arg}: expected pretrain, sft or dpo, optionally ',quick'")
  if stage == "pretrain":
    c = base_config(__file__)
    for name in ("code", "prose"):
      c.data.sources[name].exclude_modules = ",".join(stdlib_tasks.heldout_modules(HELD_OUT))
  else:
    c = base_config(__file__, f"{stage}.py")
    (source,) = c.data.sources.values()
    source.kind = "stdlib_chat" if stage == "sft" else "stdlib_pairs"
    source.val_fraction = HELD_OUT
    if stage == "dpo":
      # Chosen on the held-out pairs from the quick stack's SFT model (2026-12-03, one run each, 407
      # pairs; docs/objectives.md): β = 0.1 with 150 steps moved preference accuracy +0.015 (p = 0.5), β = 0.5 with
      # 300 steps +0.049 (p = 0.003) and, with RPO's NLL term (α = 0.5), +0.044 (p = 0.004) at a third
      # of the drift in the SFT loss; lr 5e-4 moved it more than dpo.py's 1e-4.
      c.optimizer.learning_rate = 5e-4
      c.objective.beta, c.objective.rpo_alpha = 0.5, 0.5
  if size == "quick":
    c.train.steps = QUICK_STEPS[stage]
    c.eval.every_steps = 50
    c.checkpoint.every_steps = 50
  return c
