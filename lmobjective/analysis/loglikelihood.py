"""Log-likelihoods of continuations: the one scoring rule behind per-document tables, multiple-choice
tasks and the lm-evaluation-harness adapter (`lmobjective.harness`).

A request is (context ids, continuation ids). Its row is lm-evaluation-harness's
(`HFLM._loglikelihood_tokens`): input `(context + continuation)[-(T+1):][:-1]`, and the score is the
sum of log p over the last `len(continuation)` positions, with `is_greedy` true when the argmax is the
continuation's token at each of them. Text becomes requests the harness's way too:

  * `encode_pair` (`TemplateLM._encode_pair` and its empty-context rule): trailing spaces of the context
    move to the continuation; context + continuation is encoded whole and split at the length of the
    context's own encoding; an empty context becomes the prefix token (`Tokenizer.opener_id`: BOS where
    the model's tokenizer prepends one, else EOS, which is what our runs put before every document).
  * `rolling_windows` (`utils.get_rolling_token_windows` + `make_disjoint_window`, context_len 1): a
    document of any length as disjoint windows of at most T predicted tokens; the first token is
    predicted from the prefix token, the first window's later tokens from everything before them, the
    window k > 0 from the window's preceding T tokens (its first token from one token of context; the
    last, shorter window reaches back to fill T). Each token is scored exactly once.

Everything is float32 on the device and summed in float64 on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Scored:
  """One request's score: `logprob` summed over the continuation (nats), `is_greedy`, and per token."""
  logprob: float
  is_greedy: bool
  token_logprobs: np.ndarray  # [len(continuation)] float64
  token_ids: np.ndarray  # [len(continuation)] int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as lm-evaluation-harness's `TemplateLM.loglikelihood` makes them."""
  if not context:
    cont = tokenizer.encode(continuation)
    prefix = tokenizer.opener_id
    return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
  return ctx, whole[len(ctx):]


def rolling_windows(ids: Sequence[int], prefix_id: int, max_len: int,
                    context_len: int = 1) -> list[tuple[list[int], list[int]]]:
  """(context, continuation) requests that score every token of `ids` once, at most `max_len` a window."""
  if not 1 <= context_len <= max_len:
    raise ValueError(f"context_len={context_len}: must be in [1, max_len={max_len}]")
  ids = list(ids)
  if not ids:
    return []
  first = min(max_len, len(ids))
  windows = [([prefix_id] + ids[:first - 1], ids[:first])]
  predicted, per_window = first, max_len - context_len + 1
  while predicted < len(ids):
    n = min(len(ids) - predicted, per_window)
    end = predicted + n
    windows.append((ids[max(end - max_len - 1, 0):end - 1], ids[end - n:end]))
    predicted += n
  return [(inp[:len(inp) - (len(pred) - 1)], pred) for inp, pred in windows]  # make_disjoint_window


def request_row(context: Sequence[int], continuation: Sequence[int], T: int,
                where: str = "request") -> tuple[np.ndarray, np.ndarray, int]:
  """(inputs [L], targets [L], n) of one request, L <= T, the last n targets scored."""
  if not len(context):
    raise ValueError(f"{where}: empty context (the first token is predicted from a prefix token: encode_pair)")
  if len(continuation) > T:
    raise ValueError(f"{where}: a continuation of {len(continuation)} tokens is longer than the context length {T}")
  whole = np.asarray(list(context) + list(continuation), np.int64)[-(T + 1):]
  return whole[:-1], whole[1:], len(continuation)


def score(run, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16) -> list[Scored]:
  """`Scored` of each (context ids, continuation ids) under `run` (an `inspection.Run`), in order.

  Rows are right-padded to the run's context length T and `batch_size` rows (fewer, a power of two, for
  fewer requests: one text's window is one row) go through one compiled program (`Run.row_losses`),
  whatever the requests' lengths."""
  T = run.context_length
  rows = [request_row(c, x, T, f"request {i}") for i, (c, x) in enumerate(requests)]
  batch_size = min(batch_size, 1 << max(len(rows) - 1, 0).bit_length())  # a few requests: a smaller program
  out = []
  for first in range(0, len(rows), batch_size):
    chunk = rows[first:first + batch_size]
    batch = {k: np.zeros((batch_size, T), np.int32) for k in ("inputs", "targets", "segment_ids")}
    batch["loss_mask"] = np.zeros((batch_size, T), bool)
    for r, (inputs, targets, n) in enumerate(chunk):
      L = len(inputs)
      batch["inputs"][r, :L], batch["targets"][r, :L], batch["segment_ids"][r, :L] = inputs, targets, 1
      batch["loss_mask"][r, L - n:L] = True
    batch["positions"] = np.broadcast_to(np.arange(T, dtype=np.int32), (batch_size, T)).copy()
    losses = jax.device_get(run.row_losses(run.params, batch))
    nll, correct = np.asarray(losses.nll, np.float64), np.asarray(losses.correct)
    for r, (inputs, targets, n) in enumerate(chunk):
      L = len(inputs)
      lp = -nll[r, L - n:L]
      out.append(Scored(logprob=float(lp.sum()), is_greedy=bool((correct[r, L - n:L] > 0).all()),
                        token_logprobs=lp, token_ids=np.asarray(targets[L - n:L])))
  return out


def score_text(run, ids: Sequence[int], context_len: int = 1) -> Scored:
  """Every token of a document `ids` scored once (`rolling_windows` from the prefix token), joined."""
  parts = score(run, rolling_windows(ids, run.tokenizer.opener_id, run.context_length, context_len))
  if not parts:
    return Scored(0.0, True, np.zeros(0), np.zeros(0, np.int64))
  return Scored(logprob=float(sum(p.logprob for p in parts)), is_greedy=all(p.is_greedy for p in parts),
                token_logprobs=np.concatenate([p.token_logprobs for p in parts]),
                token_ids=np.concatenate([p.token_ids for p in parts]))
