"""`python -m lmobjective.sweep --sweep=SPEC.py[:arg] --workdir=DIR [--parallel=N]`: one training run
per entry of a sweep spec, then DIR/results.{csv,md} and the sweep plots.

The command is lmobjective/sweep/runner.py's `cli` (so is the `lmobjective-sweep` script).
"""

from lmobjective.sweep.runner import cli

if __name__ == "__main__":
  cli()
