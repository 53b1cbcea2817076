"""`python -m lmobjective.evaluate --workdir=RUN --text_file=F | --source=S | --pairs_file=F`:
score a trained run (loss, perplexity, bits per byte; preference accuracy on pairs).

The command is lmobjective/analysis/evaluate.py's `cli` (so is the `lmobjective-evaluate` script).
"""

from lmobjective.analysis.evaluate import cli

if __name__ == "__main__":
  cli()
