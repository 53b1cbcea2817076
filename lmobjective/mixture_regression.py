"""`python -m lmobjective.mixture_regression --workdir=SWEEP [--law=exp|linear] [--verify]`: fit each
source's val loss against a finished mixture sweep's weights and suggest a mixture.

The command is lmobjective/sweep/mixture_regression.py's `cli` (so is the
`lmobjective-mixture-regression` script).
"""

from lmobjective.sweep.mixture_regression import cli

if __name__ == "__main__":
  cli()
