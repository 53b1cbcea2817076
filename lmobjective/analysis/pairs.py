"""Score a run's model on preference pairs, reference-free: any stage can be scored.

`evaluate_pairs(run, path)` on the pairs of a preference_jsonl file, `evaluate_pair_source(run, name)`
on a configured pair source's held-out pairs; both through `run.pair_program` (the summed response
log-probs of `next_token.sequence_logps`), each pair once, in order. `run` is an `inspection.Run`
(this module imports neither `inspection` nor `evaluate`, which both use it).
"""

from __future__ import annotations

import warnings

import jax
import numpy as np

from lmobjective import config as config_lib
from lmobjective import data, step
from lmobjective.data import streams, tokenized
from lmobjective.data.errors import DataWarning
from lmobjective.objectives import preference


def evaluate_pair_source(run, name: str, batch_size: int | None = None) -> dict[str, float]:
  """`pair_metrics` of `run` on every held-out pair of a configured pair source, each scored once."""
  return pair_metrics(pair_source_logps(run, name, batch_size))


def held_out_pair_batches(run, name: str, batch_size: int | None = None) -> list[dict[str, np.ndarray]]:
  """Every held-out pair of a configured pair source once, in the source's order, as the run's eval
  batches lay them out (truncation included; the last batch's spare slots are padding pairs)."""
  cfg = run.config
  batch_size = batch_size or int(cfg.eval.batch_size)
  pipe = data.build_pipeline(cfg.data, run.tokenizer, seed=cfg.seed, batch_size=batch_size,
                             cache_dir=cfg.data.cache_dir)
  num_pairs = pipe.stats(step=0)["sources"][name]["val_rows"]
  with warnings.catch_warnings():  # the last batch's spare slots are padding pairs, as intended
    warnings.simplefilter("ignore", DataWarning)
    return pipe.eval_batches(name, -(-num_pairs // batch_size), batch_size)


def pair_source_logps(run, name: str, batch_size: int | None = None) -> preference.PairLogps:
  """`run`'s `PairLogps` of every held-out pair of a configured pair source, in the source's order, each
  once (NumPy [P]; the last batch's padding pairs are invalid: `preference.pair_valid`)."""
  parts = [jax.device_get(run.pair_program(run.params, {k: batch[k] for k in step.MODEL_FIELDS}))
           for batch in held_out_pair_batches(run, name, batch_size)]
  return preference.PairLogps(*(np.concatenate([np.asarray(p[i]) for p in parts]) for i in range(4)))


def pair_source_sums(run, name: str, batch_size: int | None = None):
  """`run`'s objective's eval sums over every held-out pair of a configured pair source, each once, added
  on the host as its val lines add them (`Objective.add_host`): the in-run val metrics over all pairs."""
  objective = run.objective
  program = jax.jit(lambda params, batch: objective.eval_sums(run.model, params, batch, None, None))
  total = None
  for batch in held_out_pair_batches(run, name, batch_size):
    total = objective.add_host(total, jax.device_get(program(run.params, {k: batch[k] for k in objective.fields})))
  return total


def pair_metrics(logps: preference.PairLogps) -> dict[str, float]:
  """Over the valid pairs: the reference-free preference accuracy (raw; `_normalized` by length; a tie
  counts half), the mean summed log-probs and their mean margin."""
  valid_P = np.asarray(preference.pair_valid(logps))
  acc = preference.preference_accuracy(logps, valid_P)
  n = max(int(acc.num_pairs), 1)
  chosen, rejected = float(logps.chosen[valid_P].sum()) / n, float(logps.rejected[valid_P].sum()) / n
  return {"num_pairs": int(acc.num_pairs), "preference_accuracy": float(acc.correct_sum) / n,
          "preference_accuracy_normalized": float(acc.normalized_correct_sum) / n, "logps/chosen": chosen,
          "logps/rejected": rejected, "logps/margin": chosen - rejected}


def pairs_source(path: str, max_prompt_length: int | None = None, max_response_length: int | None = None):
  """The `preference_jsonl` source of a file, every pair in it (no validation split)."""
  base = config_lib.load_config_file(config_lib.DEFAULT_CONFIG).data.sources.code  # a fresh copy: ours to change
  base.update(kind="preference_jsonl", path=path, val_fraction=0.0, max_prompt_length=max_prompt_length,
              max_response_length=max_response_length)
  return config_lib.section(config_lib.SourceConfig, base, "pairs.")


def pair_logps(run, path: str, max_prompt_length: int | None = None,
               max_response_length: int | None = None, batch_size: int = 32) -> preference.PairLogps:
  """`run`'s summed response log-probs and response lengths for every pair of a preference_jsonl
  file, in file order (NumPy [P]), read and truncated as a preference run reads it."""
  split = tokenized.tokenize("pairs", pairs_source(path, max_prompt_length, max_response_length), run.tokenizer).train
  rows = streams.PairRows(split, run.context_length, run.tokenizer.pad_id, run.config.data.document_masking,
                          seed=0, key=0, shuffle=False, max_prompt_length=max_prompt_length,
                          max_response_length=max_response_length)
  parts = []
  for first in range(0, rows.num_rows, batch_size):
    batch = rows.fields(np.arange(first, first + batch_size))  # the last one wraps: cut below
    parts.append(jax.device_get(run.pair_program(run.params, {k: batch[k] for k in step.MODEL_FIELDS})))
  return preference.PairLogps(*(np.concatenate([np.asarray(p[i]) for p in parts])[:rows.num_rows] for i in range(4)))


def evaluate_pairs(run, path: str, **kw) -> dict[str, float]:
  """The reference-free preference accuracy of `run` on every pair of a preference_jsonl file
  (`pair_logps`; `kw` its truncation and batch size): the share of pairs with log π(chosen|x) >
  log π(rejected|x) (`preference_accuracy`) and with the length-averaged log-probs (`_normalized`),
  the mean summed log-probs and their mean margin (`logps/chosen`, `logps/rejected`, `logps/margin`).
  Any stage's model can be scored: it needs no reference."""
  return pair_metrics(pair_logps(run, path, **kw))
