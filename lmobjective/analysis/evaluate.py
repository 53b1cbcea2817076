"""Score a trained run on text: loss, perplexity, bits per token and bits per byte.

    python -m lmobjective.evaluate --workdir=runs/default --text_file=notes.txt
    python -m lmobjective.evaluate --workdir=runs/default --source=code [--num_batches=16] [--step=200]
    python -m lmobjective.evaluate --workdir=runs/sft --pairs_file=pairs.jsonl
    python -m lmobjective.evaluate --hf=path/to/hf_model --text_file=notes.txt   # an imported model
    python -m lmobjective.evaluate --workdir=runs/default --source=prose --per_document=prose.jsonl
    python -m lmobjective.evaluate --workdir=runs/sft --choice_task=task.jsonl

--text_file scores the file as one document (first token predicted from EOS, context-length rows).
--source scores the validation rows of a configured source exactly as the training eval does
(same rows, same eval step), so with the default --num_batches it reproduces val_loss/<source>; a
pair source gives the preference accuracy on every held-out pair. --pairs_file scores any run on
the pairs of a preference_jsonl file (reference-free: any stage can be scored). --hf scores a Hugging
Face model directory (`lmobjective.restore_hf`) instead of a run: --text_file, --documents_file,
--pairs_file and --choice_task.

--per_document=OUT.jsonl writes one row per document (`analysis/documents.py`: id, source, tokens, bytes,
summed log-prob, loss, bits per byte; every token scored once, in lm-evaluation-harness's rolling
windows) of --source (its validation documents), --text_file (one document) or --documents_file (a
JSONL of {"text", optional "id", "source"}). --choice_task scores a multiple-choice JSONL of
{context, continuations, label} (`analysis/choice.py`: acc, acc_norm, acc_bytes as the harness does);
`--choice_task=docstring` is the shipped task (`data/stdlib_choice.py`).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from lmobjective import data, step
from lmobjective.analysis import choice, documents, inspection, pairs
from lmobjective.data import sources, stdlib_choice
from lmobjective.objectives import next_token

_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (with checkpoints/ and tokenizer/).")
_HF = flags.DEFINE_string("hf", None, "A Hugging Face model directory (config.json, model.safetensors, tokenizer.json) "
                          "to score instead of a run.")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "A UTF-8 text file to score as one document.")
_SOURCE = flags.DEFINE_string("source", None, "A configured source: score its validation split.")
_PAIRS_FILE = flags.DEFINE_string("pairs_file", None, "A preference_jsonl file: the reference-free preference "
                                  "accuracy of the run on its pairs (any stage's model).")
_DOCUMENTS_FILE = flags.DEFINE_string("documents_file", None, "A JSONL of documents ({\"text\", optional \"id\", "
                                      "\"source\"}) to score one by one (with --per_document).")
_PER_DOCUMENT = flags.DEFINE_string("per_document", None, "Write one JSONL row per document of --source, "
                                    "--text_file or --documents_file here (id, source, tokens, bytes, logprob, "
                                    "loss, bits_per_byte).")
_CHOICE_TASK = flags.DEFINE_string("choice_task", None, "A multiple-choice JSONL of {context, continuations, label}: "
                                   "acc, acc_norm, acc_bytes; 'docstring' is the shipped task.")
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
  inputs = [_TEXT_FILE.value, _SOURCE.value, _PAIRS_FILE.value, _DOCUMENTS_FILE.value, _CHOICE_TASK.value]
  if [_WORKDIR.value, _HF.value].count(None) != 1 or len(inputs) - inputs.count(None) != 1:
    sys.exit("error: give --workdir or --hf, and exactly one of --text_file, --source, --pairs_file, "
             "--documents_file or --choice_task")
  if _HF.value is not None and _SOURCE.value is not None:
    sys.exit("error: --source needs a run's configured sources (--workdir); with --hf give --text_file, "
             "--documents_file, --pairs_file or --choice_task")
  if _DOCUMENTS_FILE.value is not None and _PER_DOCUMENT.value is None:
    sys.exit("error: --documents_file is scored document by document: give --per_document=OUT.jsonl")
  if _PER_DOCUMENT.value is not None and (_PAIRS_FILE.value or _CHOICE_TASK.value):
    sys.exit("error: --per_document scores documents: give it with --source, --text_file or --documents_file")
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  try:  # the inputs first (cheap); restore validates the checkpoint's config (a ConfigError is a ValueError)
    text = None if _TEXT_FILE.value is None else read_text_file(_TEXT_FILE.value)
    docs = None if _DOCUMENTS_FILE.value is None else documents.read_documents(_DOCUMENTS_FILE.value)
    items = None if _CHOICE_TASK.value is None else _choice_items(_CHOICE_TASK.value)
    if _PER_DOCUMENT.value is not None:
      _check_output(_PER_DOCUMENT.value)
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
  if items is not None:
    m = choice.evaluate(run, items)
    return _print_pairs({k: v for k, v in m.items() if k != "lls"}, run.step)
  if _SOURCE.value is not None and _SOURCE.value not in run.config.data.sources:
    sys.exit(f"error: unknown source {_SOURCE.value!r}; the run has {', '.join(run.config.data.sources)}")
  if _PER_DOCUMENT.value is not None:
    try:
      docs = docs or ([(os.path.basename(_TEXT_FILE.value), os.path.basename(_TEXT_FILE.value), text)] if text is not None
                      else _source_documents(run, _SOURCE.value))
      rows = documents.score_documents(run, docs)
    except ValueError as e:
      sys.exit(f"error: {e}")
    documents.write_jsonl(rows, _PER_DOCUMENT.value)
    t = documents.totals(rows)
    print(f"{'step':<15} {run.step}\n{'documents':<15} {t['documents']}\n{'tokens':<15} {t['tokens']}\n"
          f"{'bytes':<15} {t['bytes']}\n{'loss':<15} {t['loss']:.6f} nats/token\n"
          f"{'bits_per_byte':<15} {t['bits_per_byte']:.6f}\nwrote {_PER_DOCUMENT.value}")
    return
  if text is not None:
    m = run.perplexity([text])
  else:
    if run.config.data.sources[_SOURCE.value].kind in sources.PAIR_KINDS:
      return _print_pairs(pairs.evaluate_pair_source(run, _SOURCE.value), run.step)
    m = evaluate_source(run, _SOURCE.value, _NUM_BATCHES.value)
  print(format_metrics(m, run.step))


def _choice_items(value: str) -> list[dict]:
  return stdlib_choice.items() if value == "docstring" else choice.read_task(value)


def _check_output(path: str) -> None:
  """--per_document's file must be new, in a folder that exists (nothing is overwritten or half-written)."""
  if os.path.exists(path):
    raise ValueError(f"--per_document={path}: exists (the table is never overwritten; remove it or pick another name)")
  if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
    raise ValueError(f"--per_document={path}: no folder {os.path.dirname(os.path.abspath(path))}")


def _source_documents(run: inspection.Run, name: str) -> list[tuple[str, str, str]]:
  """(id, source, text) of each validation document of a text source of the run."""
  scfg = run.config.data.sources[name]
  if scfg.kind in sources.CHAT_KINDS or scfg.kind in sources.PAIR_KINDS:
    raise ValueError(f"--source={name}: is a {scfg.kind} source (conversations or pairs, not documents); "
                     "--per_document scores text sources")
  val = sources.load_source(name, scfg).val
  if not val:
    raise ValueError(f"--source={name}: has no validation documents (data.sources.{name}.val_fraction)")
  return [(f"{name}/val/{i}", name, doc) for i, doc in enumerate(val)]


def _print_pairs(m: dict, step_: int) -> None:
  print(f"{'step':<31} {step_}\n" + "\n".join(f"{k:<31} {v:.6g}" for k, v in m.items()))


def cli() -> None:
  from lmobjective.commands import parse_flags
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
