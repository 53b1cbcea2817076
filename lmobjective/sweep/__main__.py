"""`python -m lmobjective.sweep ...`: the sweep runner's CLI."""

from lmobjective.sweep.runner import cli

cli()
