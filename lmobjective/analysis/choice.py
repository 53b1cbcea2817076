"""Multiple-choice tasks without lm-evaluation-harness: a JSONL of {context, continuations, label}.

    python -m lmobjective.evaluate --workdir=runs/sft --choice_task=task.jsonl

Each item asks one loglikelihood request per continuation, (context, delimiter + continuation), with
the delimiter the item's optional "target_delimiter" (default " ", the harness's), encoded and scored
as the harness does (`loglikelihood.encode_pair`, `loglikelihood.score`). The metrics are the
harness's `multiple_choice` ones: `acc` (argmax of the log-likelihoods is the label), `acc_norm` (of
the log-likelihoods divided by each continuation's length in characters, delimiter excluded) and
`acc_bytes` (divided by its UTF-8 bytes), each averaged over items.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from lmobjective.analysis import loglikelihood

DEFAULT_DELIMITER = " "


def read_task(path: str) -> list[dict]:
  """The items of a task file, each checked (one-line errors naming the file and line)."""
  try:
    f = open(path, encoding="utf-8")
  except OSError as e:
    raise ValueError(f"--choice_task={path}: {(e.strerror or type(e).__name__).lower()}") from None
  out = []
  with f:
    for n, line in enumerate(f, 1):
      if line.strip():
        out.append(check_item(line, f"--choice_task={path}:{n}"))
  if not out:
    raise ValueError(f"--choice_task={path}: has no items")
  return out


def check_item(line: str, where: str) -> dict:
  try:
    item = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not JSON ({e.msg})") from None
  if not isinstance(item, dict):
    raise ValueError(f"{where}: an item is a JSON object with context, continuations and label")
  if not isinstance(item.get("context"), str):
    raise ValueError(f"{where}: needs a string 'context'")
  conts = item.get("continuations")
  if not isinstance(conts, list) or len(conts) < 2 or not all(isinstance(c, str) and c for c in conts):
    raise ValueError(f"{where}: needs 'continuations', a list of at least two non-empty strings")
  label = item.get("label")
  if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(conts):
    raise ValueError(f"{where}: 'label' {label!r} is not an index into its {len(conts)} continuations")
  if not isinstance(item.get("target_delimiter", DEFAULT_DELIMITER), str):
    raise ValueError(f"{where}: 'target_delimiter' must be a string")
  return item


def requests(items: Sequence[dict]) -> list[tuple[str, str]]:
  """The (context, delimiter + continuation) loglikelihood requests of `items`, item by item."""
  return [(it["context"], it.get("target_delimiter", DEFAULT_DELIMITER) + c) for it in items for c in it["continuations"]]


def metrics(items: Sequence[dict], lls: Sequence[float]) -> dict:
  """acc, acc_norm, acc_bytes (and num_items) of `items` given their requests' log-likelihoods, in order."""
  acc, acc_norm, acc_bytes, at = [], [], [], 0
  for it in items:
    conts = it["continuations"]
    ll = np.asarray(lls[at:at + len(conts)], np.float64)
    at += len(conts)
    chars = np.array([len(c) for c in conts], np.float64)
    nbytes = np.array([len(c.encode("utf-8")) for c in conts], np.float64)
    acc.append(np.argmax(ll) == it["label"])
    acc_norm.append(np.argmax(ll / chars) == it["label"])
    acc_bytes.append(np.argmax(ll / nbytes) == it["label"])
  return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "acc_bytes": float(np.mean(acc_bytes)),
          "num_items": len(items)}


def evaluate(run, items: Sequence[dict], batch_size: int = 16) -> dict:
  """`metrics` of `run` (an `inspection.Run`) on `items`, and the per-request log-likelihoods (`lls`)."""
  pairs = [loglikelihood.encode_pair(run.tokenizer, c, x) for c, x in requests(items)]
  lls = [s.logprob for s in loglikelihood.score(run, pairs, batch_size)]
  return {**metrics(items, lls), "lls": lls}
