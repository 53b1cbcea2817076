"""Score a trained run on text: loss, perplexity, bits per token and bits per byte.

    python -m lmobjective.evaluate --workdir=runs/default --text_file=notes.txt
    python -m lmobjective.evaluate --workdir=runs/default --source=code [--num_batches=16] [--step=200]
    python -m lmobjective.evaluate --workdir=runs/sft --pairs_file=pairs.jsonl
    python -m lmobjective.evaluate --hf=path/to/hf_model --text_file=notes.txt   # an imported model

--text_file scores the file as one document (first token predicted from EOS, context-length rows).
--source scores the validation rows of a configured source exactly as the training eval does
(same rows, same eval step), so with the default --num_batches it reproduces val_loss/<source>; a
pair source gives the preference accuracy on every held-out pair. --pairs_file scores any run on
the pairs of a preference_jsonl file (reference-free: any stage can be scored). --hf scores a Hugging
Face model directory (`lmobjective.restore_hf`) instead of a run: --text_file and --pairs_file.
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from lmobjective import data, step
from lmobjective.analysis import inspection, pairs
from lmobjective.data import sources
from lmobjective.objectives import next_token

_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (with checkpoints/ and tokenizer/).")
_HF = flags.DEFINE_string("hf", None, "A Hugging Face model directory (config.json, model.safetensors, tokenizer.json) "
                          "to score instead of a run.")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "A UTF-8 text file to score as one document.")
_SOURCE = flags.DEFINE_string("source", None, "A configured source: score its validation split.")
_PAIRS_FILE = flags.DEFINE_string("pairs_file", None, "A preference_jsonl file: the reference-free preference "
                                  "accuracy of the run on its pairs (any stage's model).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", None, "Eval batches for --source (default: eval.num_batches).")


def evaluate_source(run: inspection.Run, name: str, num_batches: int | None = None) -> dict[str, float]:
  """Token-weighted metrics over `num_batches` eval batches of source `name`'s validation split."""
  cfg = run.config
  batch_size = int(cfg.eval.batch_size)
  pipe = data.build_pipeline(cfg.data, run.tokenizer, seed=cfg.seed, batch_size=batch_size,
                             cache_dir=cfg.data.cache_dir)
  fn = run.eval_program
  sums = np.zeros(3)
  for batch in pipe.eval_batches(name, num_batches or int(cfg.eval.num_batches), batch_size):
    s = fn(run.params, {k: batch[k] for k in step.MODEL_FIELDS})
    sums += np.array([float(s.loss_sum), float(s.num_tokens), float(s.bytes_sum)])
  out = next_token.summarize(sums[0], sums[1], sums[2])
  out["num_bytes"] = int(sums[2])
  return out


def read_text_file(path: str) -> str:
  """The text of `path`; a ValueError naming the file (one line) if it is missing, empty, binary or not UTF-8."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise ValueError(f"--text_file={path}: {(e.strerror or type(e).__name__).lower()}") from None
  if not raw:
    raise ValueError(f"--text_file={path}: is empty (nothing to score)")
  if (at := sources.nul_offset(raw)) is not None:
    raise ValueError(f"--text_file={path}: is not text (NUL bytes at offset {at})")
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"--text_file={path}: is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def format_metrics(m: dict, step_: int) -> str:
  rows = [("step", f"{step_}"), ("tokens", f"{m['num_tokens']}"), ("bytes", f"{m.get('num_bytes', 0)}"),
          ("loss", f"{m['loss']:.6f} nats/token"), ("perplexity", f"{m['perplexity']:.4f}"),
          ("bits_per_token", f"{m['bits_per_token']:.6f}"),
          ("bits_per_byte", f"{m['bits_per_byte']:.6f}" if "bits_per_byte" in m else "n/a")]
  return "\n".join(f"{k:<15} {v}" for k, v in rows)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if [_WORKDIR.value, _HF.value].count(None) != 1 or [_TEXT_FILE.value, _SOURCE.value, _PAIRS_FILE.value].count(None) != 2:
    sys.exit("error: give --workdir or --hf, and exactly one of --text_file, --source or --pairs_file")
  if _HF.value is not None and _SOURCE.value is not None:
    sys.exit("error: --source needs a run's configured sources (--workdir); with --hf give --text_file or --pairs_file")
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  try:  # the text first (cheap); restore validates the checkpoint's config (a ConfigError is a ValueError)
    text = None if _TEXT_FILE.value is None else read_text_file(_TEXT_FILE.value)
    run = (inspection.restore(_WORKDIR.value, step=_STEP.value) if _HF.value is None
           else inspection.restore_hf(_HF.value))
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  if _PAIRS_FILE.value is not None:
    try:
      m = pairs.evaluate_pairs(run, _PAIRS_FILE.value)
    except (FileNotFoundError, ValueError) as e:
      sys.exit(f"error: {e}")
    return _print_pairs(m, run.step)
  if text is not None:
    m = run.perplexity([text])
  else:
    if _SOURCE.value not in run.config.data.sources:
      sys.exit(f"error: unknown source {_SOURCE.value!r}; the run has {', '.join(run.config.data.sources)}")
    if run.config.data.sources[_SOURCE.value].kind in sources.PAIR_KINDS:
      return _print_pairs(pairs.evaluate_pair_source(run, _SOURCE.value), run.step)
    m = evaluate_source(run, _SOURCE.value, _NUM_BATCHES.value)
  print(format_metrics(m, run.step))


def _print_pairs(m: dict, step_: int) -> None:
  print(f"{'step':<31} {step_}\n" + "\n".join(f"{k:<31} {v:.6g}" for k, v in m.items()))


def cli() -> None:
  from lmobjective.commands import parse_flags
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
