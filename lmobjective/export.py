"""`python -m lmobjective.export --workdir=RUN --out=DIR [--step=N]`: write a run as a Hugging Face model
directory that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads.

The command is lmobjective/analysis/export.py's `cli` (so is the `lmobjective-export` script).
"""

from lmobjective.analysis.export import cli

if __name__ == "__main__":
  cli()
