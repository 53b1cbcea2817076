"""`python -m lmobjective.diagnose --workdir=RUN`: name what went wrong in a run's loss curves, and
when (prints the findings, writes RUN/diagnostics.json).

The command is lmobjective/analysis/diagnose.py's `cli` (so is the `lmobjective-diagnose` script).
"""

from lmobjective.analysis.diagnose import cli

if __name__ == "__main__":
  cli()
