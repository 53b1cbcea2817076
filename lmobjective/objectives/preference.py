"""Preference objectives (DPO, IPO, SimPO, and RPO's NLL term on any of them) on pairs of responses,
as sums over pairs.

A pair is one prompt x with a chosen response y_w and a rejected one y_l. Every number starts
from `next_token.score`: `next_token.sequence_logps` turns its per-token log-probs into each row's
log π(y|x) (summed over the response targets only; prompt tokens are never scored) and the
row's response length. The losses read those per-pair sums and lengths, of the policy and (DPO,
IPO) of the frozen reference, and return `PreferenceSums`: sums over the valid pairs, so
microbatches, devices and hosts aggregate exactly by adding, and `summarize` divides once by
`num_pairs` to give TRL's logged metrics. Padding pairs (`pair_valid_B` false) add nothing to
any sum and get no gradient.

Notation as in the DPO paper: h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)],
σ the logistic function, β > 0.

Shape legend: B pairs (or rows), T positions.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from lmobjective.batch import MODEL_FIELDS, REFERENCE_LOGPS
from lmobjective.config import ConfigError, require_choice, require_float
from lmobjective.objectives import interface
from lmobjective.objectives import next_token

LOSS_NAMES = ("dpo", "ipo", "simpo")
REFERENCE_MODES = ("cached", "live")  # its log-probs: precomputed per pair, or a forward in every step
# β's range: beyond it float32 under- or overflows (IPO's target 1/(2β), DPO's σ(β·h) saturating to
# an exact 0 or 1), and the run would die as "non-finite loss" or "dead model" instead.
BETA_RANGE = (1e-4, 1e4)


def response_logps(losses: next_token.TokenLosses, response_mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per row: (log π(response | prompt), number of response targets).

  `losses` come from `next_token.score`; `response_mask_BxT` is true where the *target* is a
  response token. Prompt targets are never scored, whatever their ids: their log-probs are
  dropped by a select, so they change neither the value nor its gradient.
  """
  return next_token.sequence_sums(losses, response_mask_BxT)


class PairLogps(NamedTuple):
  """One model's view of B pairs: summed response log-probs and response lengths (float32/int32 [B])."""
  chosen: jax.Array  # log π(y_w | x)
  rejected: jax.Array  # log π(y_l | x)
  chosen_tokens: jax.Array  # |y_w|, response targets scored
  rejected_tokens: jax.Array  # |y_l|


def pair_logps(losses: next_token.TokenLosses, response_mask_BxT: jax.Array) -> PairLogps:
  """`PairLogps` of a pair batch: 2P rows, row 2i the chosen and row 2i+1 the rejected response
  of pair i (the layout of `preference_jsonl` batches)."""
  logp_B, n_B = response_logps(losses, response_mask_BxT)
  logp_Px2, n_Px2 = logp_B.reshape(-1, 2), n_B.reshape(-1, 2)
  return PairLogps(chosen=logp_Px2[:, 0], rejected=logp_Px2[:, 1], chosen_tokens=n_Px2[:, 0],
                   rejected_tokens=n_Px2[:, 1])


def pair_logps_of_rows(logp_B: jax.Array, like: PairLogps) -> PairLogps:
  """`PairLogps` from per-row summed log-probs [2P] (row 2i chosen, 2i+1 rejected) and the lengths of
  `like`: a cached reference's values, scored on the same rows as the policy (so the same lengths)."""
  logp_Px2 = logp_B.reshape(-1, 2)
  return like._replace(chosen=logp_Px2[:, 0], rejected=logp_Px2[:, 1])


def pairs_of(rows: next_token.SequenceLogps) -> PairLogps:
  """`PairLogps` of the 2P rows of a pair batch (row 2i chosen, 2i+1 rejected)."""
  logp_Px2, n_Px2 = rows.logp.reshape(-1, 2), rows.num_tokens.reshape(-1, 2)
  return PairLogps(chosen=logp_Px2[:, 0], rejected=logp_Px2[:, 1], chosen_tokens=n_Px2[:, 0],
                   rejected_tokens=n_Px2[:, 1])


def distinct_rows(batch: dict) -> jax.Array:
  """bool [P]: the pair's chosen and rejected rows differ in some input, target or loss-mask position.

  A tied pair (identical rows: written identical, or differing only past the truncation) has h = 0
  whatever the model: its loss is constant (ln 2 for DPO) and its gradient rounding noise, which
  Adam would scale into real steps. It is left out of every sum (`pair_valid`).
  """
  differ_P = None
  for k in ("inputs", "targets", "loss_mask"):
    x_Px2xT = batch[k].reshape((-1, 2) + batch[k].shape[1:])
    d_P = (x_Px2xT[:, 0] != x_Px2xT[:, 1]).reshape(x_Px2xT.shape[0], -1).any(axis=-1)
    differ_P = d_P if differ_P is None else differ_P | d_P
  return differ_P


def pair_valid(pairs: PairLogps, batch: dict | None = None) -> jax.Array:
  """A pair counts when both responses have a scored token (padding pairs have none) and, given the
  pair batch, its two rows differ (`distinct_rows`)."""
  valid_P = (pairs.chosen_tokens > 0) & (pairs.rejected_tokens > 0)
  return valid_P if batch is None else valid_P & distinct_rows(batch)


class PreferenceSums(NamedTuple):
  """Sums over valid pairs; add them across microbatches/devices, then call `summarize`.

  The reward and log-prob fields are what TRL logs for the loss that made them (see each loss);
  they carry no gradient (TRL detaches them too).
  """
  loss_sum: jax.Array
  num_pairs: jax.Array  # int32
  chosen_reward_sum: jax.Array  # -> rewards/chosen
  rejected_reward_sum: jax.Array  # -> rewards/rejected
  margin_sum: jax.Array  # -> rewards/margins (chosen - rejected)
  accuracy_sum: jax.Array  # -> rewards/accuracies: pairs with chosen reward > rejected reward
  chosen_logp_sum: jax.Array  # -> logps/chosen
  rejected_logp_sum: jax.Array  # -> logps/rejected
  nll_sum: jax.Array  # -> nll_loss: −log π(y_w|x)/|y_w| of the policy, summed (RPO's term, logged for every loss)


def _masked(pairs: PairLogps, pair_valid_B: jax.Array) -> tuple[jax.Array, PairLogps]:
  """Zero the padding pairs' inputs (and give them length 1) so nothing non-finite reaches a gradient."""
  valid_B = pair_valid_B.astype(bool)
  zero = lambda x: jnp.where(valid_B, x, jnp.zeros_like(x))
  one = lambda n: jnp.where(valid_B, n, jnp.ones_like(n))
  return valid_B, PairLogps(zero(pairs.chosen), zero(pairs.rejected), one(pairs.chosen_tokens),
                            one(pairs.rejected_tokens))


def _length_averaged(pairs: PairLogps) -> PairLogps:
  """log π(y)/|y| for both responses (lengths kept); an empty response averages to 0, not NaN."""
  mean = lambda s, n: s / jnp.maximum(n, 1).astype(s.dtype)
  return pairs._replace(chosen=mean(pairs.chosen, pairs.chosen_tokens),
                        rejected=mean(pairs.rejected, pairs.rejected_tokens))


def _sigmoid_loss(z_B: jax.Array, label_smoothing: float) -> jax.Array:
  """−(1−ε)·log σ(z) − ε·log σ(−z): the conservative (label-smoothed) logistic loss."""
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z_B) - label_smoothing * jax.nn.log_sigmoid(-z_B)


def _sums(valid_B, loss_B, chosen_reward_B, rejected_reward_B, logps: PairLogps, nll_B) -> PreferenceSums:
  total = lambda x: jnp.where(valid_B, x, jnp.zeros_like(x)).sum()
  metric = lambda x: jax.lax.stop_gradient(total(x))
  return PreferenceSums(
      loss_sum=total(loss_B), num_pairs=valid_B.sum(dtype=jnp.int32),
      chosen_reward_sum=metric(chosen_reward_B), rejected_reward_sum=metric(rejected_reward_B),
      margin_sum=metric(chosen_reward_B - rejected_reward_B),
      accuracy_sum=metric((chosen_reward_B > rejected_reward_B).astype(loss_B.dtype)),
      chosen_logp_sum=metric(logps.chosen), rejected_logp_sum=metric(logps.rejected),
      nll_sum=metric(nll_B))


def _chosen_nll(policy: PairLogps) -> jax.Array:
  """−log π(y_w|x)/|y_w| per pair: the chosen response's mean negative log-likelihood per token."""
  return -policy.chosen / jnp.maximum(policy.chosen_tokens, 1).astype(policy.chosen.dtype)


def with_nll(sums: PreferenceSums, policy: PairLogps, pair_valid_B: jax.Array, alpha: float) -> PreferenceSums:
  """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): the preference loss plus
  α times the chosen response's NLL, per pair and length-normalised as in the paper,

    loss = preference loss − α·log π(y_w|x)/|y_w|,

  so the likelihood of the chosen answers cannot fall while their margin grows. TRL's `rpo_alpha`
  adds the same α·NLL but averaged over all chosen tokens of the batch; the two agree when the
  chosen responses have equal lengths, and this one stays a sum over pairs (exact under accumulation).
  `nll_sum` is logged whatever α is. α = 0 returns `sums` unchanged."""
  if alpha < 0:
    raise ValueError(f"rpo_alpha must be >= 0, got {alpha}")
  if not alpha:
    return sums
  _, policy = _masked(policy, pair_valid_B)  # a padding pair: log-prob 0 over 1 token, NLL 0
  return sums._replace(loss_sum=sums.loss_sum + alpha * _chosen_nll(policy).sum())


def dpo(policy: PairLogps, reference: PairLogps, pair_valid_B: jax.Array, *, beta: float,
        label_smoothing: float = 0.0) -> PreferenceSums:
  """DPO (Rafailov et al. 2023), conservative with `label_smoothing` ε (Mitchell's cDPO):

    loss = −(1−ε)·log σ(β·h) − ε·log σ(−β·h),   h from *summed* log-probs,

  β multiplying h once. Rewards are β·(log π(y) − log π_ref(y)) per response; logps are the
  policy's summed log-probs. This is TRL's `loss_type="sigmoid"` (ε = `label_smoothing`).
  """
  valid_B, policy = _masked(policy, pair_valid_B)
  _, reference = _masked(reference, pair_valid_B)
  chosen_ratio_B = policy.chosen - reference.chosen
  rejected_ratio_B = policy.rejected - reference.rejected
  loss_B = _sigmoid_loss(beta * (chosen_ratio_B - rejected_ratio_B), label_smoothing)
  return _sums(valid_B, loss_B, beta * chosen_ratio_B, beta * rejected_ratio_B, policy, _chosen_nll(policy))


def ipo(policy: PairLogps, reference: PairLogps, pair_valid_B: jax.Array, *, beta: float) -> PreferenceSums:
  """IPO (Azar et al. 2023, eq. 17, β their τ) as TRL computes it (`loss_type="ipo"`):

    loss = (h̄ − 1/(2β))²,   h̄ = h from *length-averaged* log-probs log π(y)/|y|,

  no σ and no β on h̄. The paper writes h with summed log-probs; TRL divides every sequence's
  log-prob (policy and reference) by its response length first, and so do we. Rewards and logps
  are TRL's too, hence also from the averages: β·(log π(y)/|y| − log π_ref(y)/|y|) and log π(y)/|y|.
  """
  valid_B, policy = _masked(policy, pair_valid_B)
  _, reference = _masked(reference, pair_valid_B)
  nll_B = _chosen_nll(policy)
  policy, reference = _length_averaged(policy), _length_averaged(reference)
  chosen_ratio_B = policy.chosen - reference.chosen
  rejected_ratio_B = policy.rejected - reference.rejected
  loss_B = jnp.square(chosen_ratio_B - rejected_ratio_B - 1.0 / (2.0 * beta))
  return _sums(valid_B, loss_B, beta * chosen_ratio_B, beta * rejected_ratio_B, policy, nll_B)


def simpo(policy: PairLogps, pair_valid_B: jax.Array, *, beta: float, gamma: float,
          label_smoothing: float = 0.0) -> PreferenceSums:
  """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised:

    loss = −log σ(β·log π(y_w)/|y_w| − β·log π(y_l)/|y_l| − γ).

  `gamma` is the paper's γ, the target reward margin; TRL's CPO trainer (`loss_type="simpo"`)
  takes the same γ as `simpo_gamma`, while SimPO's own code and Levanter take
  `gamma_beta_ratio` = γ/β (so γ = β·gamma_beta_ratio). `label_smoothing` ε > 0 gives TRL's
  conservative form −(1−ε)·log σ(z) − ε·log σ(−z) (not in the paper; 0 is the paper). Rewards
  are β·log π(y)/|y| and logps the averages log π(y)/|y|, as TRL logs them.
  """
  valid_B, policy = _masked(policy, pair_valid_B)
  nll_B = _chosen_nll(policy)
  policy = _length_averaged(policy)
  chosen_reward_B, rejected_reward_B = beta * policy.chosen, beta * policy.rejected
  loss_B = _sigmoid_loss(chosen_reward_B - rejected_reward_B - gamma, label_smoothing)
  return _sums(valid_B, loss_B, chosen_reward_B, rejected_reward_B, policy, nll_B)


def preference_loss(name: str, policy: PairLogps, reference: PairLogps | None, pair_valid_B: jax.Array,
                    *, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
                    rpo_alpha: float = 0.0) -> PreferenceSums:
  """The loss called `name` (one of LOSS_NAMES), plus `rpo_alpha` times the chosen NLL (`with_nll`).
  A setting the loss does not use must stay at its default (IPO has no ε, only SimPO has γ, SimPO
  has no reference): a silently ignored knob is a bug."""
  return with_nll(_named_loss(name, policy, reference, pair_valid_B, beta=beta, label_smoothing=label_smoothing,
                              gamma=gamma), policy, pair_valid_B, rpo_alpha)


def _named_loss(name: str, policy: PairLogps, reference: PairLogps | None, pair_valid_B: jax.Array,
                *, beta: float, label_smoothing: float, gamma: float) -> PreferenceSums:
  if name not in LOSS_NAMES:
    raise ValueError(f"unknown preference loss {name!r}; expected one of {LOSS_NAMES}")
  if beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  if gamma and name != "simpo":
    raise ValueError(f"gamma={gamma} is a SimPO setting; {name} has no margin")
  if label_smoothing and name == "ipo":
    raise ValueError(f"label_smoothing={label_smoothing} is not defined for IPO")
  if name == "simpo":
    if reference is not None:
      raise ValueError("SimPO is reference-free: pass reference=None")
    return simpo(policy, pair_valid_B, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
  if reference is None:
    raise ValueError(f"{name} needs the reference model's log-probs")
  if name == "dpo":
    return dpo(policy, reference, pair_valid_B, beta=beta, label_smoothing=label_smoothing)
  return ipo(policy, reference, pair_valid_B, beta=beta)


class AccuracySums(NamedTuple):
  """Reference-free ranking accuracy: valid pairs where the policy prefers the chosen response (a tie half)."""
  num_pairs: jax.Array  # int32
  correct_sum: jax.Array  # log π(y_w) > log π(y_l), + 0.5 per tie (float32)
  normalized_correct_sum: jax.Array  # log π(y_w)/|y_w| > log π(y_l)/|y_l|, + 0.5 per tie


def preference_accuracy(policy: PairLogps, pair_valid_B: jax.Array) -> AccuracySums:
  """How often the policy alone ranks the pair right, by summed and by length-averaged log-prob; a
  tie counts as half (a coin flip: a model that cannot tell the two apart scores 0.5, not 0). Needs
  no reference, so it reads the same before and after any training."""
  valid_B, policy = _masked(policy, pair_valid_B)
  averaged = _length_averaged(policy)
  score = lambda c_B, r_B: jnp.where(valid_B, (c_B > r_B).astype(jnp.float32) + 0.5 * (c_B == r_B), 0.0).sum()
  return AccuracySums(num_pairs=valid_B.sum(dtype=jnp.int32), correct_sum=score(policy.chosen, policy.rejected),
                      normalized_correct_sum=score(averaged.chosen, averaged.rejected))


def accuracy_metrics(acc: AccuracySums) -> dict[str, float]:
  """preference_accuracy and preference_accuracy_normalized (nothing without pairs)."""
  n = int(acc.num_pairs)
  if not n:
    return {}
  return {"preference_accuracy": float(acc.correct_sum) / n,
          "preference_accuracy_normalized": float(acc.normalized_correct_sum) / n}


def summarize(sums: PreferenceSums) -> dict[str, float]:
  """Host-side means over pairs under TRL's names; with no pairs, the loss is NaN and nothing else."""
  n = int(sums.num_pairs)
  if n == 0:
    return {"loss": float("nan"), "num_pairs": 0}
  mean = lambda x: float(x) / n
  return {"loss": mean(sums.loss_sum), "rewards/chosen": mean(sums.chosen_reward_sum),
          "rewards/rejected": mean(sums.rejected_reward_sum), "rewards/margins": mean(sums.margin_sum),
          "rewards/accuracies": mean(sums.accuracy_sum), "logps/chosen": mean(sums.chosen_logp_sum),
          "logps/rejected": mean(sums.rejected_logp_sum), "nll_loss": mean(sums.nll_sum), "num_pairs": n}


# ---- the objectives ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preference(interface.Objective):
  """A loss over pairs (`preference_loss`): a group is one pair's two rows, the gradient's
  denominator the batch's valid pairs, the metrics TRL's. Each kind declares the keys it reads; the
  others keep their neutral values."""
  beta: float = 0.1
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.0
  rpo_alpha: float = 0.0
  reference: str = "cached"

  group_size: ClassVar[int] = 2
  examples: ClassVar[str] = "pairs"
  per_token: ClassVar[bool] = False

  @property
  def needs_reference(self) -> bool:
    return "reference" in self.keys

  @property
  def cached_reference(self) -> bool:
    """The reference's log-probs come with the batches (`run/reference_cache.py`), not from a forward."""
    return self.needs_reference and self.reference == "cached"

  @property
  def fields(self) -> tuple[str, ...]:
    return MODEL_FIELDS + ((REFERENCE_LOGPS,) if self.cached_reference else ())

  @classmethod
  def validate(cls, cfg) -> None:
    lo, hi = BETA_RANGE
    require_float(cfg, "objective.beta", 0.0, lo_open=True)
    if not lo <= cfg.objective.beta <= hi:
      raise ConfigError("objective.beta", cfg.objective.beta, f"must be in [{lo:g}, {hi:g}]: beyond it float32 "
                        "under- or overflows (IPO's target 1/(2β), DPO's σ(β·h) saturates) and the run dies")
    require_float(cfg, "objective.rpo_alpha", 0.0)
    if "label_smoothing" in cls.keys:
      require_float(cfg, "objective.label_smoothing", 0.0, 0.5)
      if cfg.objective.label_smoothing == 0.5:
        raise ConfigError("objective.label_smoothing", 0.5, "must be < 0.5: at 0.5 the loss is symmetric in chosen "
                          "and rejected, and its gradient at the reference is exactly zero")
    if "simpo_gamma" in cls.keys:
      require_float(cfg, "objective.simpo_gamma", 0.0)
    if "reference" in cls.keys:
      require_choice(cfg, "objective.reference", REFERENCE_MODES)
      if not cfg.train.init_from:
        raise ConfigError("train.init_from", cfg.train.init_from, f"objective.kind={cfg.objective.kind!r} needs a "
                          "reference: the run to start from (WORKDIR or WORKDIR:STEP)")

  def pair_logps(self, model, params, batch, deterministic=True, rngs=None) -> PairLogps:
    return pairs_of(next_token.sequence_logps(model, params, batch, chunk_size=self.loss_chunk_size,
                                             deterministic=deterministic, rngs=rngs))

  def reference_logps(self, model, reference_params, batch, policy: PairLogps) -> PairLogps:
    """The frozen reference's `PairLogps`: the batch's cached values when it has them (made before
    training by this same `sequence_logps` on the same rows), else a forward of `reference_params`."""
    if REFERENCE_LOGPS in batch:
      return pair_logps_of_rows(batch[REFERENCE_LOGPS], policy)
    if reference_params is None:
      raise ValueError(f"objective.kind={self.kind!r} needs reference_params or the batch's reference_logps")
    return self.pair_logps(model, jax.lax.stop_gradient(reference_params), batch)

  def pair_loss(self, policy: PairLogps, reference: PairLogps | None, pair_valid_P) -> PreferenceSums:
    return preference_loss(self.kind, policy, reference, pair_valid_P, beta=self.beta,
                           label_smoothing=self.label_smoothing, gamma=self.simpo_gamma, rpo_alpha=self.rpo_alpha)

  def _scored(self, model, params, batch, reference_params, deterministic=True, rngs=None):
    policy = self.pair_logps(model, params, batch, deterministic, rngs)
    reference = self.reference_logps(model, reference_params, batch, policy) if self.needs_reference else None
    return policy, reference, pair_valid(policy, batch)

  def loss(self, model, params, micro, rng, reference_params, deterministic):
    """(loss sum over the microbatch's pairs, (PreferenceSums, scored response tokens))."""
    policy, reference, valid_P = self._scored(model, params, micro, reference_params, deterministic,
                                              None if deterministic else {"dropout": rng})
    sums = self.pair_loss(policy, reference, valid_P)
    return sums.loss_sum, (sums, policy.chosen_tokens.sum() + policy.rejected_tokens.sum())

  def denominator(self, sums):
    return sums[0].num_pairs

  def step_metrics(self, sums):
    pref, num_tokens = sums
    return {"loss": pref.loss_sum / jnp.maximum(pref.num_pairs, 1).astype(jnp.float32), **pref._asdict(),
            "num_tokens": num_tokens}

  def eval_sums(self, model, params, batch, reference_params, token_bytes_V):
    """The loss's sums and the reference-free preference accuracy of one batch of pairs."""
    policy, reference, valid_P = self._scored(model, params, batch, reference_params)
    return self.pair_loss(policy, reference, valid_P), preference_accuracy(policy, valid_P)

  def eval_record(self, per_source):
    """On the held-out pairs: val_loss (the loss per pair), TRL's metrics as val_rewards/* and val_logps/*,
    the reference-free val_preference_accuracy (raw and _normalized by length), overall; val_loss/<source>
    and val_preference_accuracy/<source> per source."""
    out, total = {}, None
    for name, sums in per_source.items():
      m = self._metrics(*sums)
      out[f"val_loss/{name}"] = m["loss"]
      out[f"val_preference_accuracy/{name}"] = m.get("preference_accuracy", float("nan"))
      total = interface.add(total, sums)
    if total is not None:
      out.update({f"val_{k}": v for k, v in self._metrics(*total).items()})
    return out

  @staticmethod
  def _metrics(pref: PreferenceSums, acc: AccuracySums) -> dict[str, float]:
    return {**summarize(pref), **accuracy_metrics(acc)}

  def train_record(self, metrics):
    """train_loss per pair and TRL's rewards/* and logps/* over the window's pairs."""
    m = summarize(PreferenceSums(*(interface.window_sum(metrics, k) for k in PreferenceSums._fields)))
    return {"train_loss": m.pop("loss"), **m}


@dataclasses.dataclass(frozen=True)
class DPO(Preference):
  kind: str = "dpo"
  keys: ClassVar[tuple[str, ...]] = ("beta", "label_smoothing", "rpo_alpha", "reference")


@dataclasses.dataclass(frozen=True)
class IPO(Preference):
  kind: str = "ipo"
  keys: ClassVar[tuple[str, ...]] = ("beta", "rpo_alpha", "reference")


@dataclasses.dataclass(frozen=True)
class SimPO(Preference):
  kind: str = "simpo"
  keys: ClassVar[tuple[str, ...]] = ("beta", "label_smoothing", "simpo_gamma", "rpo_alpha")
