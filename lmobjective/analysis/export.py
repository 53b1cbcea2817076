"""Write a run as a Hugging Face model directory (`python -m lmobjective.export`).

    python -m lmobjective.export --workdir=runs/default --out=runs/default_hf [--step=N] [--max_shard_mb=2048]

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained(out)`: config.json (the
architecture that computes what `config.model` does: GPT-2, Llama, Qwen2 or Qwen3), model.safetensors
(float32; shards and an index above --max_shard_mb), generation_config.json, and the tokenizer's
tokenizer.json when it is one (`data.tokenizer.kind=hf`). A SentencePiece, byte or character tokenizer
has no tokenizer.json form here: said in one line, and the ids stay those of WORKDIR/tokenizer.
A model with no such architecture (relu2, a LayerNorm with RoPE, ...) is refused in one line naming the
key, and an existing --out is never written into.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging

from lmobjective.analysis import inspection
from lmobjective.hf import export

def export_run(run: inspection.Run, out: str, max_shard_bytes: int = 2 << 30) -> tuple[list[str], str | None]:
  """(files written, a note when the tokenizer has no tokenizer.json form) for `run` into `out`."""
  tok = run.tokenizer
  family = export.family_of(run.model.cfg)  # refuses before anything is written
  tokenizer_json = tok.tokenizer_json() if tok.kind == "hf" else None
  note = None if tokenizer_json is not None else (
      f"note: the run's {tok.kind} tokenizer has no tokenizer.json form here; {out} holds none (the model's "
      f"ids are those of {os.path.join(run.workdir, 'tokenizer')})")
  names = export.write(run.params, run.model.cfg, out, bos_id=getattr(tok, "bos_id", None), eos_id=tok.eos_id,
                       family=family, tokenizer_json=tokenizer_json, max_shard_size=max_shard_bytes)
  return names, note


def main(workdir: str | None, out: str | None, step: int | None, max_shard_mb: int) -> None:
  if workdir is None or out is None:
    sys.exit("error: give --workdir and --out")
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  path = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(path):
    sys.exit(f"error: --out={out}: exists; export writes a new directory")
  if max_shard_mb < 1:
    sys.exit(f"error: --max_shard_mb={max_shard_mb}: must be at least 1")
  try:
    run = inspection.restore(workdir, step=step)
    names, note = export_run(run, path, max_shard_mb << 20)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  if note:
    print(note)
  print(f"wrote {path} (step {run.step}):")
  for name in names:
    print(f"  {name:<40} {os.path.getsize(os.path.join(path, name)):>12,} bytes")


def cli() -> None:
  """The flags are defined here, not at import: the test of every door imports them all in one process."""
  from lmobjective.commands import parse_flags
  workdir = flags.DEFINE_string("workdir", None, "The run directory (with checkpoints/ and tokenizer/).")
  out = flags.DEFINE_string("out", None, "The Hugging Face directory to write (must not exist).")
  step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).")
  shard = flags.DEFINE_integer("max_shard_mb", 2048, "Largest safetensors file, in MiB; above it the weights are "
                               "sharded with model.safetensors.index.json.")

  def run_main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    main(workdir.value, out.value, step.value, shard.value)
  app.run(run_main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
