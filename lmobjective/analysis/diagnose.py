"""Loss-curve diagnostics: read a run's metrics.jsonl, name what went wrong and when.

  python -m lmobjective.diagnose --workdir=RUN      # prints findings, writes RUN/diagnostics.json

Each finding is {"kind", "start_step", "end_step", "detail"}; `detail` states the evidence and the
likely causes. Kinds and rules (all thresholds are stated here and in `Thresholds`):

* breakdown (reported as divergence): training itself broke down, whatever the loss curve shows.
  Any of: a non-finite train/val loss; a `{"step", "diverged": reason}` line (the training loop
  stopped the run); `skipped_steps` (updates skipped for a non-finite loss or gradient,
  train.nan_policy=skip) at least 10% of the steps run; grad_norm exactly 0 on a train line that
  scored tokens (a dead model: the loss no longer depends on the parameters); param_norm above 100
  times its first logged value (or non-finite). The finding starts at the earliest such step and
  names every sign (step, grad norm, param norm growth). The curve after that step describes a
  broken model: only findings that end before it are kept, and a flat loss near ln V is reported
  in this finding, never as not_learning (whose cause list blames a too-low learning rate).
* noise scale sigma: the robust standard deviation of the train-loss noise,
  1.4826 * MAD(second differences) / sqrt(6) (second differences cancel a locally linear trend,
  and the second difference of iid noise has variance 6 sigma^2).
* divergence: a breakdown (above); or a final level (median of the last 10% of points) above
  1.1 ln V -- worse than a uniform guess, which is where an untrained model starts; or a final
  level above the running minimum of the smoothed loss by more than max(6 sigma, 5% of that
  minimum) -- a rise a 6-sigma noise excursion does not explain.
* spike: a point whose robust z-score against the median/MAD of the previous `window` points is
  above 6 and which is at least 5% above that median, and after which the loss comes back within
  3 robust scales of the pre-spike median (if it never comes back it is a divergence instead).
* plateau: an early stall -- a flat stretch (rolling-median loss moves less than max(2 sigma,
  0.5%)) starting in the first 25% of the run and lasting at least 20% of it, after which the loss
  falls by more than 5 times that tolerance (or never moves again): a stall, not a slow descent.
* overfitting: validation loss ends more than 2% above its minimum, with at least 2 evals after the
  minimum, while the train loss over the same steps kept falling.
* not_learning: the loss stayed within 10% of ln V (the loss of a uniform guess) and fell by less
  than 5% of ln V overall -- even the unigram distribution of text is worth more than that.

Reward maximisation runs (lines with `objective/kl`, written by `run/rl_loop.py`) have a policy loss,
not a likelihood: the loss-curve kinds above do not apply to them. Their breakdown signs are the same
(a line whose last update had no response with a non-zero advantage, `signal_sequences` 0, never
counts as a dead model: its gradient is 0 by construction), and four kinds read the rollout metrics
(docs/metrics.md), each over the train lines where its rule holds:

* kl_blowup: `objective/kl_full_per_token`, the full-distribution KL(pi || pi_ref) per sampled token,
  above 1 nat: the policy has left the reference it is regularised towards.
* entropy_collapse: the full-distribution entropy per sampled token (`objective/entropy_full` /
  `completions/mean_length`) below 10% of its first logged value: the policy samples nearly one
  response per prompt and exploration ends (expected only once the task is solved; the finding
  states the mean reward there).
* no_signal: `frac_reward_zero_std` at least 0.9 on at least 20% of the train lines: nine groups in
  ten scored every response alike, so their advantages are 0 and the score drives no update.
* truncation: `completions/clipped_ratio` at least 0.2 on at least 20% of the train lines: a fifth
  of the responses hit rl.max_new_tokens without a stop token.

A run that watches a reward it does not optimise (weight 0 in rl.reward_weights, logged on its eval
lines as `val_watched/<term>/sampled`: a gold reward beside a proxy) adds:

* reward_hacking: the watched reward peaks, then falls by at least a quarter of its rise to that
  peak (and 1e-3), while the optimised reward (`val_reward_sampled`) ends above its value at the peak;
  the finding spans the peak to the last eval (at least 3 eval lines).

PPO runs (objective.kind=ppo) add two kinds for the critic (the value head):

* value_blowup: `loss/value_avg` above 10 times its minimum over the earlier lines while the critic
  does worse than the returns' mean there (`val/var_explained` < 0), or not finite: a loss that
  only follows returns growing in scale is not one.
* critic_unexplained: `val/var_explained` (1 - Var(R - V)/Var(R) over the rollout's response tokens)
  at most 0 on at least 5 consecutive train lines and 20% of them: the critic explains none of the
  return's variance, so GAE's advantages are no better than the return itself. A fresh head starts
  at 0, so its first lines alone do not count.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import numpy as np

from lmobjective import files

DIAGNOSTICS_FILE = "diagnostics.json"
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution * 1.4826 = its standard deviation


@dataclasses.dataclass(frozen=True)
class Thresholds:
  z: float = 6.0  # robust z-score for a spike / the divergence rise in units of sigma
  spike_rel: float = 0.05  # a spike must also be this far above the local median (relative)
  diverge_rel: float = 0.05  # divergence rise floor, relative to the running minimum
  recover_z: float = 3.0  # back within this many robust scales = recovered
  plateau_rel: float = 0.005  # flat = moves less than max(2 sigma, this * level)
  plateau_min_frac: float = 0.20  # a plateau lasts at least this share of the run ...
  plateau_start_frac: float = 0.25  # ... and starts in this early share of it
  plateau_escape: float = 5.0  # ... and the loss later falls by more than this many tolerances
  overfit_rel: float = 0.02  # val ends this far above its minimum
  overfit_min_evals: int = 2
  not_learning_frac: float = 0.10  # final loss within this share of ln V ...
  not_learning_drop: float = 0.05  # ... and fell by less than this share of ln V
  window: int = 10  # points in the rolling median/MAD
  skipped_frac: float = 0.10  # breakdown: skipped updates are at least this share of the steps run
  dead_grad_norm: float = 0.0  # breakdown: grad_norm <= this (exactly 0) on a line that scored tokens
  param_growth: float = 100.0  # breakdown: param_norm above this multiple of its first logged value
  kl_per_token: float = 1.0  # kl_blowup: full-distribution KL per sampled token above this (nats)
  entropy_floor: float = 0.10  # entropy_collapse: per-token entropy below this share of its first value
  no_signal_frac: float = 0.9  # no_signal: frac_reward_zero_std at least this ...
  truncation_frac: float = 0.2  # truncation: completions/clipped_ratio at least this ...
  rl_lines_frac: float = 0.2  # ... (either) on at least this share of the train lines
  value_blowup: float = 10.0  # value_blowup: loss/value_avg above this multiple of its running minimum, the critic
  #                             then worse than the returns' mean (val/var_explained < 0), or not finite
  critic_min_lines: int = 5  # critic_unexplained: val/var_explained <= 0 on this many consecutive train lines ...
  critic_lines_frac: float = 0.2  # ... and on at least this share of them
  hacking_drop: float = 0.25  # reward_hacking: a watched (gold) reward falls from its peak by this share of its
  #                             rise to it (and by more than hacking_floor) while the optimised reward rises past
  hacking_floor: float = 1e-3  # its value at that peak; on at least 3 eval lines
  hacking_z: float = 2.0  # ... both changes larger than this many standard errors of the difference (when logged)


CAUSES = {
    "divergence": "learning rate too high (or warmup too short), no/too loose gradient clipping, "
                  "low-precision overflow, or a bad batch",
    "spike": "a bad or unusual batch, or a learning rate at the edge of stability (Adam's second "
             "moment lagging a sudden gradient)",
    "plateau": "learning rate too low or warmup too long, a poor init scale, or the model stuck "
               "predicting unigram frequencies before it finds context",
    "overfitting": "too little (repeated) data for the model size and steps: more data, fewer "
                   "steps, weight decay or dropout",
    "not_learning": "learning rate far too low (or zero), a schedule that never warms up, "
                    "frozen params, or labels not aligned with inputs",
    "kl_blowup": "objective.beta too small, a learning rate too high, too many rl.epochs on one batch, "
                 "or a reward that pays for text the reference would not write (reward hacking)",
    "entropy_collapse": "a learning rate too high, objective.beta 0 or too small, rl.temperature too low, "
                        "or a reward one degenerate response maximises",
    "no_signal": "a task too hard (every response scores 0) or too easy (every one scores 1) for the "
                 "model, rl.num_generations too small, rl.temperature too low, or a reward that is constant",
    "truncation": "rl.max_new_tokens too small for the task, a model that never learned to stop (the SFT "
                  "stage's template), or a reward that pays for length; rl.missing_eos_penalty and "
                  "rl.mask_truncated_completions act on it",
    "value_blowup": "rl.vf_coef or the learning rate too high for the value head, rl.cliprange_value too loose, "
                    "returns on a scale the critic cannot follow (rl.whiten_advantages does not rescale them; a "
                    "reward model's scores or objective.beta set it), or the policy moving faster than the critic",
    "reward_hacking": "the optimised reward (a reward model, a proxy) pays for something the watched one does not: "
                      "objective.beta too small, too many iterations, a reward model fitted on too few pairs or "
                      "evaluated off the distribution it was fitted on; stop at the peak, raise objective.beta, or "
                      "refit the proxy on the policy's own samples",
    "critic_unexplained": "a critic that learns too slowly (rl.vf_coef or the learning rate too small), returns "
                          "dominated by noise (a noisy reward, a high rl.temperature), or rl.gamma/rl.lam giving "
                          "targets it cannot fit; its advantages are then no better than the return itself",
}


def _finite(v) -> float:
  try:
    return float(v)  # "nan"/"inf" strings from metrics_log become floats
  except (TypeError, ValueError):
    return float("nan")


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  pts = [(r["step"], _finite(r[key])) for r in records if key in r]
  if not pts:
    return np.zeros(0, int), np.zeros(0)
  s, v = zip(*pts)
  return np.asarray(s), np.asarray(v, np.float64)


def noise_sigma(loss: np.ndarray) -> float:
  """Robust per-point noise: second differences cancel a locally linear trend; var(d2) = 6 sigma^2."""
  d2 = np.diff(loss[np.isfinite(loss)], 2)
  if len(d2) < 3:
    return 0.0
  return MAD_TO_SIGMA * float(np.median(np.abs(d2 - np.median(d2)))) / math.sqrt(6)


def rolling_median(x: np.ndarray, w: int) -> np.ndarray:
  """Centred rolling median (shrinking at the ends)."""
  h = w // 2
  return np.array([np.median(x[max(0, i - h):i + h + 1]) for i in range(len(x))])


def _finding(kind, start, end, evidence) -> dict[str, Any]:
  return {"kind": kind, "start_step": int(start), "end_step": int(end),
          "detail": f"{evidence}. Likely causes: {CAUSES[kind]}."}


def _nonfinite(records: list[dict], th: Thresholds) -> tuple[int, str] | None:
  for key in ("train_loss", "val_loss"):
    s, v = series(records, key)
    bad = np.flatnonzero(~np.isfinite(v))
    if len(bad):
      return int(s[bad[0]]), f"{key} is {v[bad[0]]} from step {s[bad[0]]}"
  return None


def _stopped(records: list[dict], th: Thresholds) -> tuple[int, str] | None:
  """The line the training loop writes when it stops a broken run: {"step": N, "diverged": reason}."""
  r = next((r for r in records if "diverged" in r), None)
  return None if r is None else (int(r["step"]), f"the training loop stopped the run at step {r['step']}: "
                                                 f"{r['diverged']}")


def _skipped(records: list[dict], th: Thresholds) -> tuple[int, str] | None:
  s, k = series(records, "skipped_steps")  # cumulative over the run (a resume carries it on)
  if not len(k) or s[-1] <= 0 or k[-1] < th.skipped_frac * s[-1]:
    return None
  first = int(s[np.argmax(k > 0)])
  return first, (f"{int(k[-1])} of {s[-1]} steps ({k[-1] / s[-1]:.0%} >= {th.skipped_frac:.0%}) skipped for a "
                 f"non-finite loss or gradient, the first by step {first}")


def _dead(records: list[dict], th: Thresholds) -> tuple[int, str] | None:
  """grad_norm exactly 0 on train lines that scored tokens (tokens_seen grew since the last line)."""
  lines, before = [], 0
  for r in records:
    if "train_loss" in r and "grad_norm" in r:
      seen = r.get("tokens_seen")
      scored = seen > before if seen is not None else _finite(r["train_loss"]) > 0
      before = seen if seen is not None else before
      if scored and r.get("signal_sequences", 1) > 0:  # RL: no non-zero advantage = a zero gradient by design
        lines.append((int(r["step"]), _finite(r["grad_norm"]), _finite(r["train_loss"])))
  dead = [i for i, (_, g, _) in enumerate(lines) if g <= th.dead_grad_norm]
  if not dead:
    return None
  step, grad, loss = lines[dead[0]]
  what = "exactly 0" if grad == 0 else f"{grad:g} (<= {th.dead_grad_norm:g})"
  return step, (f"grad_norm is {what} from step {step} (on {len(dead)} of the {len(lines) - dead[0]} train "
                f"lines from there, train loss {loss:.4g} at it) while tokens were scored: a dead model, "
                "the loss no longer depends on the parameters")


def _param_growth(records: list[dict], th: Thresholds) -> tuple[int, str] | None:
  s, v = series(records, "param_norm")
  if len(v) < 2 or not v[0] > 0:
    return None
  big = np.flatnonzero(~(v <= th.param_growth * v[0]))  # NaN/Inf count as grown
  if not len(big):
    return None
  i = int(big[0])
  return int(s[i]), (f"param_norm grew from {v[0]:.3g} (step {s[0]}) to {v[i]:.3g} by step {s[i]} "
                     f"(x{v[i] / v[0]:.3g} > x{th.param_growth:g}), {np.nanmax(v):.3g} at most")


BREAKDOWN_SIGNS = (_nonfinite, _stopped, _skipped, _dead, _param_growth)


def find_breakdown(records: list[dict], vocab_size: int | None, th: Thresholds) -> list[dict]:
  """One divergence finding naming every sign that training broke down (module docstring), or []."""
  signs = sorted(e for e in (sign(records, th) for sign in BREAKDOWN_SIGNS) if e is not None)
  if not signs:
    return []
  evidence = "; ".join(text for _, text in signs)
  flat = _near_uniform(records, vocab_size, th)
  if flat is not None:  # what not_learning would say, with the cause it would miss
    key, _, v, ln_v, src = flat
    evidence += (f"; {key} stayed near {src} = {ln_v:.3f} ({v[0]:.3f} -> {v[-1]:.3f}) because the model "
                 "broke down, not because the learning rate is too low")
  last = max(int(r["step"]) for r in records)
  return [_finding("divergence", signs[0][0], last, f"training broke down from step {signs[0][0]}: {evidence}")]


def find_spikes(steps, loss, th: Thresholds, sigma: float) -> tuple[list[dict], list[dict]]:
  """(spikes that recover, divergences that start with a spike and never recover)."""
  spikes, diverged, i = [], [], th.window // 2
  while i < len(loss):
    prev = loss[max(0, i - th.window):i]
    med = float(np.median(prev))
    scale = max(MAD_TO_SIGMA * float(np.median(np.abs(prev - med))), sigma, 1e-3 * abs(med))
    z = (loss[i] - med) / scale
    if z > th.z and loss[i] > med * (1 + th.spike_rel):
      back = np.flatnonzero(loss[i + 1:] <= med + th.recover_z * scale)
      if len(back) == 0:
        diverged.append(_finding("divergence", steps[i], steps[-1],
                                 f"loss jumped from {med:.3f} to {loss[i]:.3f} (robust z={z:.0f}) "
                                 "at this step and never came back"))
        break
      j = i + 1 + int(back[0])
      peak = float(loss[i:j].max())
      spikes.append(_finding("spike", steps[i], steps[j - 1],
                             f"loss jumped from {med:.3f} to {peak:.3f} (robust z={z:.0f}) and "
                             f"recovered by step {steps[j]}"))
      i = j
    i += 1
  return spikes, diverged


def find_worse_than_uniform(steps, loss, vocab_size: int | None, th: Thresholds) -> list[dict]:
  """Loss ending more than 10% above ln V: worse than guessing uniformly, whatever the noise."""
  if not vocab_size or len(loss) < 3:
    return []
  limit = (1 + th.not_learning_frac) * math.log(vocab_size)
  smooth = rolling_median(loss, 3)
  final = float(np.median(loss[-max(3, len(loss) // 10):]))
  if final <= limit:
    return []
  start = int(np.argmax(smooth > limit))
  return [_finding("divergence", steps[start], steps[-1],
                   f"loss ended at {final:.3f}, above 1.1 ln V = {limit:.3f} (worse than a uniform guess "
                   f"over {vocab_size} tokens) from step {steps[start]}")]


def find_rise(steps, loss, th: Thresholds, sigma: float) -> list[dict]:
  """Loss ending well above its running minimum (a rise without recovery)."""
  if len(loss) < th.window:
    return []
  smooth = rolling_median(loss, th.window)
  k = int(np.argmin(smooth))
  tail = max(3, len(loss) // 10)
  final = float(np.median(loss[-tail:]))
  limit = smooth[k] + max(th.z * sigma, th.diverge_rel * smooth[k])
  if final <= limit or k >= len(loss) - tail:
    return []
  start = k + int(np.argmax(smooth[k:] > limit)) if np.any(smooth[k:] > limit) else k
  return [_finding("divergence", steps[start], steps[-1],
                   f"loss rose from its minimum {smooth[k]:.3f} (step {steps[k]}) to {final:.3f} at the "
                   f"end, more than max({th.z:g} sigma, {th.diverge_rel:.0%}) = {limit - smooth[k]:.3f}")]


def find_plateau(steps, loss, th: Thresholds, sigma: float) -> list[dict]:
  n = len(loss)
  if n < th.window or steps[-1] <= steps[0]:
    return []
  smooth = rolling_median(loss, max(3, th.window // 2))
  span = steps[-1] - steps[0]
  best = None
  for a in range(n):
    if steps[a] - steps[0] > th.plateau_start_frac * span:
      break
    tol = max(2 * sigma, th.plateau_rel * abs(smooth[a]))
    b = a
    while b + 1 < n and abs(smooth[b + 1] - smooth[a]) < tol:
      b += 1
    if steps[b] - steps[a] >= th.plateau_min_frac * span and (best is None or b - a > best[1] - best[0]):
      best = (a, b, tol)
  if best is None:
    return []
  a, b, tol = best
  final = float(np.median(loss[-max(3, n // 10):]))
  if b < n - 1 and smooth[a] - final <= th.plateau_escape * tol:
    return []  # a slow descent or a converged run, not a stall that the loss later escapes
  after = ("then fell to " f"{final:.3f} by the end") if smooth[a] - final > tol else "and never fell"
  return [_finding("plateau", steps[a], steps[b],
                   f"loss stayed at {smooth[a]:.3f} (within {tol:.3f}) for {steps[b] - steps[a]} steps "
                   f"early in the run, {after}")]


def find_overfitting(records: list[dict], th: Thresholds) -> list[dict]:
  vs, vl = series(records, "val_loss")
  if len(vl) < th.overfit_min_evals + 1 or not np.all(np.isfinite(vl)):
    return []
  k = int(np.argmin(vl))
  if len(vl) - 1 - k < th.overfit_min_evals or vl[-1] <= vl[k] * (1 + th.overfit_rel):
    return []
  ts, tl = series(records, "train_loss")
  i = int(np.searchsorted(ts, vs[k], side="right"))  # train points up to the val minimum
  w = max(1, len(tl) // 10)
  if len(tl) - i < w:
    return []
  before, after = float(np.mean(tl[max(0, i - w):max(i, w)])), float(np.mean(tl[-w:]))
  if not after < before:
    return []
  return [_finding("overfitting", vs[k], vs[-1],
                   f"val loss rose from its minimum {vl[k]:.3f} (step {vs[k]}) to {vl[-1]:.3f} "
                   f"(+{vl[-1] / vl[k] - 1:.1%}) while train loss fell from {before:.3f} to {after:.3f}")]


def _near_uniform(records: list[dict], vocab_size: int | None, th: Thresholds) -> tuple | None:
  """(key, steps, values, ln V, its source) when the loss stayed near ln V and barely fell, else None."""
  if is_rl(records):
    return None  # a policy loss is no likelihood
  key = "val_loss" if any("val_loss" in r for r in records) else "train_loss"
  s, v = series(records, key)
  if len(v) < 2 or not np.all(np.isfinite(v)):
    return None
  ln_v = math.log(vocab_size) if vocab_size else float(v[0])  # an untrained model scores ~ln V
  if (v.min() < (1 - th.not_learning_frac) * ln_v or v[-1] > (1 + th.not_learning_frac) * ln_v
      or v[0] - v[-1] >= th.not_learning_drop * ln_v):
    return None
  return key, s, v, ln_v, f"ln V = ln {vocab_size}" if vocab_size else "the first eval loss (vocab unknown)"


def find_not_learning(records: list[dict], vocab_size: int | None, th: Thresholds) -> list[dict]:
  flat = _near_uniform(records, vocab_size, th)
  if flat is None:
    return []
  key, s, v, ln_v, src = flat
  return [_finding("not_learning", s[0], s[-1],
                   f"{key} went from {v[0]:.3f} to {v[-1]:.3f}, still near {src} = {ln_v:.3f} (fell "
                   f"by {v[0] - v[-1]:.3f} < {th.not_learning_drop:.0%} of it)")]


def diagnose(records: list[dict], vocab_size: int | None = None,
             th: Thresholds = Thresholds()) -> list[dict]:
  """All findings for one run's metric records, sorted by start step.

  After a breakdown (`find_breakdown`) the curve describes a broken model: only the findings of
  the records before its first step are kept, next to it.
  """
  broke = find_breakdown(records, vocab_size, th)
  if broke:
    start = broke[0]["start_step"]
    return sorted(broke + find_in_curve([r for r in records if r["step"] < start], vocab_size, th),
                  key=lambda f: (f["start_step"], f["kind"]))
  return find_in_curve(records, vocab_size, th)


def find_in_curve(records: list[dict], vocab_size: int | None, th: Thresholds) -> list[dict]:
  """The findings the loss curves alone show (every kind but breakdown), sorted by start step."""
  if is_rl(records):
    return find_rl(records, th)
  steps, loss = series(records, "train_loss")
  sigma = noise_sigma(loss)
  spikes, diverged = find_spikes(steps, loss, th, sigma)
  diverged = diverged or find_worse_than_uniform(steps, loss, vocab_size, th) or find_rise(steps, loss, th, sigma)
  found = spikes + diverged
  if not diverged:
    found += find_not_learning(records, vocab_size, th) or find_plateau(steps, loss, th, sigma)
  found += find_overfitting(records, th)
  return sorted(found, key=lambda f: (f["start_step"], f["kind"]))


# ---- reward maximisation ------------------------------------------------------------------------------


def is_rl(records: list[dict]) -> bool:
  return any("objective/kl" in r for r in records)


def _lines(records: list[dict], value) -> tuple[np.ndarray, np.ndarray]:
  """(steps, value(record)) over the RL train lines (those with rollout metrics)."""
  rows = [r for r in records if "objective/kl" in r]
  return np.asarray([r["step"] for r in rows], int), np.asarray([value(r) for r in rows], np.float64)


def _where(steps, hit, th: Thresholds, min_frac: float = 0.0):
  """(first, last) step of the lines where `hit` holds, when they are at least min_frac of all lines."""
  k = np.flatnonzero(hit)
  if not len(k) or len(k) < min_frac * len(steps):
    return None
  return int(steps[k[0]]), int(steps[k[-1]])


def find_kl_blowup(records: list[dict], th: Thresholds) -> list[dict]:
  steps, kl = _lines(records, lambda r: _finite(r.get("objective/kl_full_per_token", 0.0)))
  span = _where(steps, ~(kl <= th.kl_per_token), th)  # NaN counts
  if span is None:
    return []
  return [_finding("kl_blowup", *span, f"the full-distribution KL to the reference reached {np.nanmax(kl):.3g} "
                   f"nats per sampled token (> {th.kl_per_token:g}) from step {span[0]}, after {kl[0]:.3g} at "
                   f"step {steps[0]}")]


def find_entropy_collapse(records: list[dict], th: Thresholds) -> list[dict]:
  per_token = lambda r: _finite(r.get("objective/entropy_full", "nan")) / max(_finite(r.get("completions/mean_length", 1.0)), 1e-9)
  steps, h = _lines(records, per_token)
  _, reward = _lines(records, lambda r: _finite(r.get("reward", "nan")))
  if len(h) < 2 or not np.isfinite(h[0]) or h[0] <= 0:
    return []
  span = _where(steps, h < th.entropy_floor * h[0], th)
  if span is None:
    return []
  i = int(np.searchsorted(steps, span[0]))
  return [_finding("entropy_collapse", *span, f"the policy's entropy fell from {h[0]:.3g} to {h[i]:.3g} nats per "
                   f"sampled token (< {th.entropy_floor:.0%} of its first value) by step {span[0]}, with the mean "
                   f"reward there {reward[i]:.3g} (expected only once the task is solved)")]


def find_no_signal(records: list[dict], th: Thresholds) -> list[dict]:
  steps, frac = _lines(records, lambda r: _finite(r.get("frac_reward_zero_std", 0.0)))
  hit = frac >= th.no_signal_frac
  span = _where(steps, hit, th, th.rl_lines_frac)
  if span is None:
    return []
  _, reward = _lines(records, lambda r: _finite(r.get("reward", "nan")))
  return [_finding("no_signal", *span, f"on {int(hit.sum())} of {len(steps)} train lines at least "
                   f"{th.no_signal_frac:.0%} of the prompts' groups scored all their responses alike (mean reward "
                   f"there {np.nanmean(reward[hit]):.3g}): their advantages are 0 and the score moves nothing")]


def find_truncation(records: list[dict], th: Thresholds) -> list[dict]:
  steps, clipped = _lines(records, lambda r: _finite(r.get("completions/clipped_ratio", 0.0)))
  hit = clipped >= th.truncation_frac
  span = _where(steps, hit, th, th.rl_lines_frac)
  if span is None:
    return []
  return [_finding("truncation", *span, f"on {int(hit.sum())} of {len(steps)} train lines at least "
                   f"{th.truncation_frac:.0%} of the responses hit rl.max_new_tokens without stopping (at most "
                   f"{np.nanmax(clipped):.0%})")]


def find_value_blowup(records: list[dict], th: Thresholds) -> list[dict]:
  steps, v = _lines(records, lambda r: _finite(r.get("loss/value_avg", "nan")))
  if not len(v) or "loss/value_avg" not in next(r for r in records if "objective/kl" in r):
    return []
  _, ev = _lines(records, lambda r: _finite(r.get("val/var_explained", "nan")))
  floor = np.minimum.accumulate(np.where(np.isfinite(v), v, np.inf))  # the running minimum up to each line
  earlier = np.concatenate([[np.inf], floor[:-1]])
  hit = ~np.isfinite(v) | ((v > th.value_blowup * earlier) & ~(ev >= 0))  # NaN EV (no variance) counts as worse
  span = _where(steps, hit, th)
  if span is None:
    return []
  i = int(np.searchsorted(steps, span[0]))
  return [_finding("value_blowup", *span, f"the value loss (loss/value_avg) rose to {v[i]:.3g} at step {span[0]}, "
                   f"{v[i] / earlier[i]:.3g}x its minimum {earlier[i]:.3g} before it, with the critic explaining "
                   f"{ev[i]:.3g} of the returns' variance there")]


def _longest_run(hit: np.ndarray) -> tuple[int, int]:
  """(start index, length) of the longest run of True in `hit` ((0, 0) when none)."""
  best, start = (0, 0), None
  for i, h in enumerate(np.append(hit, False)):
    if h and start is None:
      start = i
    elif not h and start is not None:
      best, start = max(best, (start, i - start), key=lambda b: b[1]), None
  return best


def find_critic_unexplained(records: list[dict], th: Thresholds) -> list[dict]:
  steps, ev = _lines(records, lambda r: _finite(r.get("val/var_explained", "nan")))
  hit = ev <= 0  # NaN (returns without variance) is neither
  first, n = _longest_run(hit)
  if n < max(th.critic_min_lines, th.critic_lines_frac * len(steps)):
    return []
  last = first + n - 1
  return [_finding("critic_unexplained", steps[first], steps[last], f"the critic explained none of the returns' "
                   f"variance (val/var_explained <= 0, from {ev[first]:.3g} to {ev[last]:.3g}) on {n} consecutive "
                   f"train lines of {len(steps)}, steps {steps[first]}-{steps[last]}")]


def find_reward_hacking(records: list[dict], th: Thresholds) -> list[dict]:
  """For each watched term (`val_watched/<term>/sampled`, weight 0: a gold reward) on the held-out eval lines:
  its peak, a fall after it to the last eval by at least th.hacking_drop of its rise from the first eval
  (and th.hacking_floor) and, where the lines carry the means' standard errors (`..._stderr`), by more
  than th.hacking_z of the difference's (√(se_peak² + se_last²)); and the optimised reward
  (`val_reward_sampled`) at the last eval above its value at the peak, by the same z where it has them."""
  evals = sorted((r for r in records if "val_reward_sampled" in r), key=lambda r: r["step"])
  out = []
  for key in sorted({k for r in evals for k in r if k.startswith("val_watched/") and k.endswith("/sampled")}):
    rows = [r for r in evals if key in r]
    if len(rows) < 3:
      continue
    steps = np.array([r["step"] for r in rows])
    gold, proxy = (np.array([_finite(r[k]) for r in rows]) for k in (key, "val_reward_sampled"))
    peak = int(np.nanargmax(gold))
    rise, fall = gold[peak] - gold[0], gold[peak] - gold[-1]
    if peak == len(rows) - 1 or not fall >= max(th.hacking_drop * max(rise, 0.0), th.hacking_floor):
      continue
    if not (fall > th.hacking_z * _stderr_of_difference(rows[peak], rows[-1], key)
            and proxy[-1] - proxy[peak] > th.hacking_z * _stderr_of_difference(rows[peak], rows[-1], "val_reward_sampled")):
      continue
    term = key.split("/")[1]
    out.append(_finding("reward_hacking", steps[peak], steps[-1],
                        f"the optimised reward rose {proxy[peak]:.4g} -> {proxy[-1]:.4g} on held-out prompts from "
                        f"step {steps[peak]} to {steps[-1]} while the watched reward '{term}' fell {gold[peak]:.4g} -> "
                        f"{gold[-1]:.4g} (it had risen {rise:+.4g} from {gold[0]:.4g} at step {steps[0]})"))
  return out


def _stderr_of_difference(a: dict, b: dict, key: str) -> float:
  """√(se_a² + se_b²) of two eval lines' means of `key` (0 where a line has no `key`_stderr: no noise test)."""
  se = [r.get(key + "_stderr") for r in (a, b)]
  return 0.0 if any(v is None or not np.isfinite(v) for v in se) else float(np.hypot(*se))


def find_rl(records: list[dict], th: Thresholds) -> list[dict]:
  found = (find_kl_blowup(records, th) + find_entropy_collapse(records, th) + find_no_signal(records, th)
           + find_truncation(records, th) + find_value_blowup(records, th) + find_critic_unexplained(records, th)
           + find_reward_hacking(records, th))
  return sorted(found, key=lambda f: (f["start_step"], f["kind"]))


def vocab_size_of(run_dir: str) -> int | None:
  """model.vocab_size from config.json, else the saved tokenizer's size, else None."""
  config = files.read_json(os.path.join(run_dir, "config.json"), default={})
  v = config.get("model", {}).get("vocab_size")
  if isinstance(v, int):
    return v
  meta = files.read_json(os.path.join(run_dir, "tokenizer", "tokenizer.json"), default={})
  return int(meta["vocab_size"]) if isinstance(meta.get("vocab_size"), int) else None


def summarize(findings: list[dict]) -> str:
  """One cell for a results table: 'spike@120-130; overfitting@200-300' or 'none'."""
  return "; ".join(f"{f['kind']}@{f['start_step']}-{f['end_step']}" for f in findings) or "none"


def diagnose_run(run_dir: str, write: bool = True, verbose: bool = True) -> list[dict]:
  from lmobjective.run.metrics_log import read_metrics
  findings = diagnose(read_metrics(run_dir), vocab_size_of(run_dir))
  if write:
    files.write_json(os.path.join(run_dir, DIAGNOSTICS_FILE), findings, indent=1)
  if verbose:
    print(f"diagnostics: {len(findings)} finding(s)" if findings else "diagnostics: no findings")
    for f in findings:
      print(f"  {f['kind']} (steps {f['start_step']}-{f['end_step']}): {f['detail']}")
  return findings


def load(run_dir: str) -> list[dict] | None:
  return files.read_json(os.path.join(run_dir, DIAGNOSTICS_FILE))


def cli() -> None:
  from absl import app, flags

  from lmobjective.commands import parse_flags
  workdir = flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not workdir.value or not os.path.exists(os.path.join(workdir.value, "metrics.jsonl")):
      sys.exit(f"error: --workdir={workdir.value!r} has no metrics.jsonl")
    diagnose_run(workdir.value)

  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
