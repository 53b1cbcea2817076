"""Reward maximisation: policy-gradient losses on sampled responses (RLOO, GRPO, REINFORCE).

max_π E_{y~π}[r(x,y)] − β·KL(π(·|x) ‖ π_ref(·|x)) has the optimum π* ∝ π_ref·exp(r/β). What an
implementation reaches depends on three choices, each a key here (docs/objectives.md):

  advantages     RLOO's leave-one-out baseline R_i − mean_{j≠i} R_j (keeps the expectation);
                 GRPO's (R − group mean)/std (`scale_rewards` group | batch | none); REINFORCE's
                 R − batch mean. A mean that includes the sample scales the reward's gradient by
                 (G−1)/G (the batch's N: (N−1)/N).
  the KL         `kl_placement` reward: −β·Σ_t k1 is added to the score before the advantages
                 (the gradient of the reverse KL: π*); loss: β·k2 or β·k3 per token (k3's gradient
                 is the forward KL's: another fixed point), or β·½(Σ_t log π/π_ref)² per sequence
                 (`k2_sequence`, the one loss placement exact for sequences). k1 in the loss has zero
                 expected gradient and k2/k3 in a detached reward have no interior fixed point:
                 both are refused (`refused`).
  aggregation    `loss_type` dapo: Σ over the batch's tokens / its token count; grpo: each
                 sequence's mean, then the mean over sequences; dr_grpo: Σ / (sequences ·
                 max_new_tokens). Every one is a sum over rows divided once by a count of the
                 whole batch, so microbatches and devices give the update of one large batch.

The surrogate on each sampled token is PPO's clipped one, −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A) with
ρ = π/π_old; with one epoch and one minibatch π_old is the stop-gradient of π itself (ρ = 1, the
gradient is A·∇log π: TRL's choice), else the log-probs of a forward before the first update.

Every function is pure and dtype-preserving, so the float64 tests (`tests/test_policy_fixed_points.py`) run the
same code. Shape legend: B rows (P prompts × G generations), T positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmobjective.batch import MODEL_FIELDS
from lmobjective.config import ConfigError, require_choice, require_float, require_int
from lmobjective.objectives import distribution, interface

ADVANTAGE_KINDS = ("rloo", "grpo", "reinforce")
SCALE_REWARDS = ("group", "batch", "none")
KL_PLACEMENTS = ("reward", "loss")
KL_ESTIMATORS = ("k1", "k2", "k3", "k2_sequence")
LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
STD_EPS = 1e-4  # GRPO's std + eps (TRL's value): a group of equal rewards gets advantage 0, not 0/0

# The batch fields an RL update reads beside the model's (float32; T = the row's positions).
ADVANTAGES = "advantages"  # [B] one per response, broadcast over its tokens ([B,T] per token: PPO)
OLD_VALUES = "old_values"  # [B,T] PPO: the value head's estimates when the responses were sampled
RETURNS = "returns"  # [B,T] PPO: GAE's value targets
OLD_LOGPS = "old_logps"  # [B,T] π_old of each target (0 off the response): only when ρ is not 1
REF_LOGPS = "ref_logps"  # [B,T] π_ref of each target: only with the KL in the loss

# The rl.* keys only PPO reads (`ppo.PPO`), with their defaults: another RL objective refuses other values.
PPO_ONLY = {"gamma": 1.0, "lam": 0.95, "cliprange_value": 0.2, "vf_coef": 0.1, "whiten_advantages": False}

# Why each refused (placement, estimator) pair is refused: one line, for the config error and the docs.
REFUSED = {
    ("loss", "k1"): "k1 in the loss has zero expected gradient (E_π[∇log π] = 0): no KL pressure at all; "
                    "put k1 in the reward, or use k2, k3 or k2_sequence in the loss",
    ("reward", "k2"): "k2 in a detached reward has no interior fixed point (it drives low-probability "
                      "responses to 0); only k1 belongs in the reward",
    ("reward", "k3"): "k3 in a detached reward has no interior fixed point (its expected gradient is "
                      "∇[KL(π‖π_ref) − KL(π_ref‖π)]); only k1 belongs in the reward",
    ("reward", "k2_sequence"): "k2_sequence is a loss term; in a detached reward it has no interior fixed "
                               "point; only k1 belongs in the reward",
}


# ---- advantages ------------------------------------------------------------------------------------


def advantages(rewards_PxG: jax.Array, kind: str, scale_rewards: str = "group") -> jax.Array:
  """[P,G] advantages of G responses to each of P prompts (rows of one prompt together).

  rloo: R_i − mean of the group's other G−1 rewards; reinforce: R − the whole batch's mean;
  grpo: (R − group mean) / (std + STD_EPS), the std (ddof 1, as TRL and Tunix) of the group,
  of the whole batch, or 1 (`scale_rewards` none)."""
  r = rewards_PxG
  G = r.shape[-1]
  if kind == "rloo":  # R_i − (Σ_j R_j − R_i)/(G−1) = G/(G−1)·(R_i − mean)
    return G / (G - 1) * (r - _mean(r, axis=-1))
  if kind == "reinforce":
    return r - _mean(r)
  if kind != "grpo":
    raise ValueError(f"advantages: unknown kind {kind!r} (one of {ADVANTAGE_KINDS})")
  centred = r - _mean(r, axis=-1)
  if scale_rewards == "none":
    return centred
  std = r.std(axis=-1, ddof=1, keepdims=True) if scale_rewards == "group" else r.std(ddof=1)
  return centred / (std + STD_EPS)


def _mean(r: jax.Array, axis=None) -> jax.Array:
  """The mean, clamped into [min, max]: a rounding guard. A sum of G equal floats is not always G
  times the value (float32 0.7 × 8 summed in order is off by an ulp), so without it a group of equal
  rewards got advantages of ~1e-7 (RLOO, REINFORCE) or ~6e-4 (GRPO: ~1e-7 / (std + STD_EPS)), counted
  as signal; clamped, a constant group's mean is its value and its advantages are exactly 0."""
  return jnp.clip(r.mean(axis=axis, keepdims=True), r.min(axis=axis, keepdims=True), r.max(axis=axis, keepdims=True))


# ---- the KL to the reference -----------------------------------------------------------------------


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
  """Schulman's per-token estimators of KL(π‖π_ref) at tokens drawn from π, with log q = log π_ref − log π:
  k1 = −log q, k2 = ½(log q)², k3 = q − 1 − log q (elementwise)."""
  log_q = ref_logp - logp
  if estimator == "k1":
    return -log_q
  if estimator == "k2":
    return 0.5 * jnp.square(log_q)
  if estimator == "k3":
    return jnp.expm1(log_q) - log_q
  raise ValueError(f"kl_estimate: unknown per-token estimator {estimator!r} (k1, k2 or k3)")


def sequence_k1(logp_BxT: jax.Array, ref_logp_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """[B] Σ_t k1 over each response: log π(y) − log π_ref(y), the KL in the reward."""
  return jnp.where(mask_BxT, logp_BxT - ref_logp_BxT, 0).sum(axis=-1)


def full_kl(logp_xV: jax.Array, ref_logp_xV: jax.Array) -> jax.Array:
  """[...] KL(π(·|s)‖π_ref(·|s)) of two full distributions (Rao–Blackwellised: no sampling noise);
  ids π gives no mass add nothing (even where π_ref gives none either)."""
  p = jnp.exp(logp_xV)
  return jnp.where(p > 0, p * (logp_xV - jnp.where(p > 0, ref_logp_xV, 0)), 0).sum(axis=-1)


def entropy(logp_xV: jax.Array) -> jax.Array:
  """[...] −Σ_v π(v) log π(v) of a full distribution (ids without mass add nothing)."""
  p = jnp.exp(logp_xV)
  return -jnp.where(p > 0, p * logp_xV, 0).sum(axis=-1)


# ---- the loss ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """What `policy_loss` computes (static)."""
  beta: float = 0.0
  kl_placement: str = "reward"
  kl_estimator: str = "k1"
  loss_type: str = "dapo"
  cliprange: float = 0.2
  cliprange_high: float | None = None  # None = cliprange (DAPO's clip-higher when larger)
  max_new_tokens: int = 1  # dr_grpo's constant normaliser is sequences × this

  @property
  def kl_in_loss(self) -> bool:
    return self.beta > 0 and self.kl_placement == "loss"


class PolicySums(NamedTuple):
  """Sums over one microbatch (add across microbatches, devices, hosts); divide by `denominator` once."""
  loss_sum: jax.Array  # what is differentiated: Σ_rows w_row·(pg_row + β·kl_row), w per loss_type
  pg_sum: jax.Array  # its policy-gradient part
  kl_sum: jax.Array  # its KL part, without β (0 with the KL in the reward)
  num_tokens: jax.Array  # response tokens scored
  num_sequences: jax.Array  # responses (rows)
  clipped_tokens: jax.Array  # tokens where the clipped term was the one taken (policy/clipfrac)
  ratio_sum: jax.Array  # Σ ρ over tokens (val/ratio)
  approxkl_sum: jax.Array  # Σ ½(log π − log π_old)² over tokens (policy/approxkl)
  signal_sequences: jax.Array  # responses with a non-zero advantage and a scored token


def policy_loss(logp_BxT: jax.Array, old_logp_BxT: jax.Array, advantages_B: jax.Array, mask_BxT: jax.Array,
                ref_logp_BxT: jax.Array | None, cfg: LossConfig, row_valid_B: jax.Array | None = None
                ) -> PolicySums:
  """The clipped surrogate plus (with the KL in the loss) β times its KL term, aggregated per
  `cfg.loss_type` as a sum over rows (see `denominator`). `mask` marks each response's scored tokens.
  `advantages_B` is one per response, or [B,T] one per token (PPO's GAE)."""
  mask = mask_BxT.astype(bool)
  dtype = logp_BxT.dtype
  zero = jnp.zeros((), dtype)
  A_Bx1 = advantages_B.astype(dtype)
  A_Bx1 = A_Bx1[:, None] if A_Bx1.ndim == 1 else A_Bx1
  log_ratio = jnp.where(mask, logp_BxT - old_logp_BxT, 0)
  ratio = jnp.exp(log_ratio)
  hi = cfg.cliprange if cfg.cliprange_high is None else cfg.cliprange_high
  clipped_ratio = jnp.clip(ratio, 1 - cfg.cliprange, 1 + hi)
  pg_BxT = jnp.where(mask, -jnp.minimum(ratio * A_Bx1, clipped_ratio * A_Bx1), 0)
  pg_B = pg_BxT.sum(axis=-1)
  kl_B = jnp.zeros_like(pg_B)
  if cfg.kl_in_loss:
    if cfg.kl_estimator == "k2_sequence":
      kl_B = 0.5 * jnp.square(jnp.where(mask, logp_BxT - ref_logp_BxT, 0).sum(axis=-1))
    else:
      kl_B = jnp.where(mask, kl_estimate(logp_BxT, ref_logp_BxT, cfg.kl_estimator), 0).sum(axis=-1)
  n_B = mask.sum(axis=-1)
  w_B = row_weights(mask, cfg.loss_type, dtype)
  row_valid_B = jnp.ones(mask.shape[:1], bool) if row_valid_B is None else row_valid_B
  is_clipped = mask & (((ratio < 1 - cfg.cliprange) & (A_Bx1 < 0)) | ((ratio > 1 + hi) & (A_Bx1 > 0)))
  pg, kl = (w_B * pg_B).sum(), (w_B * kl_B).sum()
  return PolicySums(
      loss_sum=pg + (cfg.beta * kl if cfg.kl_in_loss else zero), pg_sum=pg, kl_sum=kl,
      num_tokens=n_B.sum(dtype=jnp.int32), num_sequences=row_valid_B.sum(dtype=jnp.int32),
      clipped_tokens=is_clipped.sum(dtype=jnp.int32), ratio_sum=jnp.where(mask, ratio, 0).sum(),
      approxkl_sum=0.5 * jnp.square(log_ratio).sum(),
      signal_sequences=((jnp.where(mask, A_Bx1, 0) != 0).any(axis=-1) & (n_B > 0) & row_valid_B).sum(dtype=jnp.int32))


def row_weights(mask_BxT: jax.Array, loss_type: str, dtype) -> jax.Array:
  """[B] each row's weight in a sum over rows: 1/|y| for `grpo` (a mean per sequence), else 1."""
  n_B = mask_BxT.sum(axis=-1)
  return 1 / jnp.maximum(n_B, 1).astype(dtype) if loss_type == "grpo" else jnp.ones(n_B.shape, dtype)


def denominator(sums: PolicySums, cfg: LossConfig) -> jax.Array:
  """What the step's summed gradient is divided by, once: tokens (dapo), sequences (grpo), or
  sequences × max_new_tokens (dr_grpo)."""
  if cfg.loss_type == "dapo":
    return sums.num_tokens
  if cfg.loss_type == "grpo":
    return sums.num_sequences
  return sums.num_sequences * cfg.max_new_tokens


def refused(placement: str, estimator: str) -> str | None:
  """Why the KL pair (placement, estimator) is refused, or None when it is allowed."""
  return REFUSED.get((placement, estimator))


# ---- the objective -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PolicyGradient(interface.Objective):
  """RLOO, GRPO or REINFORCE (`advantages`) through the generic step: a group is one prompt's
  `num_generations` responses, never split; the batch carries the advantages (and the old and
  reference log-probs when they are needed), made by the rollout loop (`run/rollout.py`) once per
  iteration. The policy's log-probs are `distribution.score` at the sampling distribution, the one code
  path the sampler drew with."""
  kind: str = "rloo"
  beta: float = 0.05
  num_generations: int = 2
  scale_rewards: str = "group"
  loss_cfg: LossConfig = LossConfig()
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  off_policy: bool = False  # epochs × minibatches > 1: ρ against the batch's old_logps

  examples: ClassVar[str] = "prompts"
  keys: ClassVar[tuple[str, ...]] = ("beta",)
  per_token: ClassVar[bool] = False

  @property
  def group_size(self) -> int:  # type: ignore[override]
    return self.num_generations

  @property
  def fields(self) -> tuple[str, ...]:
    return (MODEL_FIELDS + (ADVANTAGES,) + ((OLD_LOGPS,) if self.off_policy else ())
            + ((REF_LOGPS,) if self.loss_cfg.kl_in_loss else ()))

  def sampling_config(self, **overrides):
    return distribution.SamplingConfig(**{"max_new_tokens": self.loss_cfg.max_new_tokens, "temperature": self.temperature,
                                      "top_k": self.top_k, "top_p": self.top_p, **overrides})

  def token_logps(self, model, params, batch, deterministic=True, rngs=None, h_BxTxD=None) -> jax.Array:
    """[B,T] log-probs of the batch's targets under the distribution the sampler drew from (0 off the mask)."""
    losses = distribution.score(model, params, batch, self.sampling_config(), chunk_size=self.loss_chunk_size,
                                deterministic=deterministic, rngs=rngs, h_BxTxD=h_BxTxD)
    return jnp.where(losses.valid, -losses.nll, 0.0)

  def _sums(self, model, params, batch, deterministic=True, rngs=None, h_BxTxD=None) -> PolicySums:
    logp = self.token_logps(model, params, batch, deterministic, rngs, h_BxTxD)
    old = batch[OLD_LOGPS] if self.off_policy else jax.lax.stop_gradient(logp)
    ref = batch.get(REF_LOGPS)
    row_valid = (batch["segment_ids"] > 0).any(axis=-1)
    return policy_loss(logp, old, batch[ADVANTAGES], batch["loss_mask"], ref, self.loss_cfg, row_valid)

  def loss(self, model, params, micro, rng, reference_params, deterministic):  # noqa: D102
    sums = self._sums(model, params, micro, deterministic, None if deterministic else {"dropout": rng})
    return sums.loss_sum, sums

  def denominator(self, sums):
    return denominator(sums, self.loss_cfg)

  def step_metrics(self, sums: PolicySums):
    den = jnp.maximum(self.denominator(sums), 1).astype(jnp.float32)
    return {"loss": sums.loss_sum / den, "pg_loss": sums.pg_sum / den, **sums._asdict()}

  def eval_sums(self, model, params, batch, reference_params, token_bytes_V):
    """The loss's sums on a batch of scored responses (the RL stage evaluates by sampling instead)."""
    return self._sums(model, params, batch)

  def eval_record(self, per_source):
    total = None
    for sums in per_source.values():
      total = interface.add(total, sums)
    return {} if total is None else {"val_loss": float(total.loss_sum / max(self.denominator(total), 1))}

  def train_record(self, metrics):
    """Over a window of updates: train_loss and loss/policy_avg (the step's means, averaged),
    policy/clipfrac_avg, policy/approxkl_avg and val/ratio per response token."""
    tokens = max(interface.window_sum(metrics, "num_tokens"), 1)
    mean = lambda key: float(np.mean([np.float64(m[key]) for m in metrics]))
    return {"train_loss": mean("loss"), "loss/policy_avg": mean("pg_loss"),
            "policy/clipfrac_avg": interface.window_sum(metrics, "clipped_tokens") / tokens,
            "policy/approxkl_avg": interface.window_sum(metrics, "approxkl_sum") / tokens,
            "val/ratio": interface.window_sum(metrics, "ratio_sum") / tokens}

  @classmethod
  def updates_per_step(cls, cfg) -> int:
    return cfg.rl.epochs * cfg.rl.num_minibatches

  @classmethod
  def validate(cls, cfg) -> None:
    require_float(cfg, "objective.beta", 0.0)
    rl = cfg.rl
    require_int(cfg, "rl.num_generations", 1)
    if rl.num_generations < 2 and cfg.objective.kind in ("rloo", "grpo"):
      raise ConfigError("rl.num_generations", rl.num_generations, f"objective.kind={cfg.objective.kind!r} needs >= 2 "
                        "responses per prompt (its baseline is the group's other responses)")
    require_choice(cfg, "rl.scale_rewards", SCALE_REWARDS)
    if rl.scale_rewards != "group" and cfg.objective.kind != "grpo":
      raise ConfigError("rl.scale_rewards", rl.scale_rewards, "only objective.kind='grpo' scales rewards "
                        "(leave it at 'group')")
    require_choice(cfg, "rl.kl_placement", KL_PLACEMENTS)
    require_choice(cfg, "rl.kl_estimator", KL_ESTIMATORS)
    why = refused(rl.kl_placement, rl.kl_estimator)
    if why and cfg.objective.beta > 0:
      raise ConfigError("rl.kl_estimator", rl.kl_estimator, f"with rl.kl_placement={rl.kl_placement!r}: {why}")
    require_choice(cfg, "rl.loss_type", LOSS_TYPES)
    require_float(cfg, "rl.cliprange", 0.0, lo_open=True)
    if rl.cliprange_high is not None:
      require_float(cfg, "rl.cliprange_high", rl.cliprange)
    if cfg.model.dropout > 0:
      raise ConfigError("model.dropout", cfg.model.dropout, "reward maximisation needs dropout 0: the sampler, "
                        "the old and the reference log-probs are deterministic forwards, so dropout would make "
                        "the ratio differ from 1 at the first update")
    if not cfg.train.init_from:
      raise ConfigError("train.init_from", cfg.train.init_from, f"objective.kind={cfg.objective.kind!r} starts from "
                        "a trained model, which is also the frozen reference (WORKDIR or WORKDIR:STEP)")
    if not cls.scored:
      for key, default in PPO_ONLY.items():
        if rl[key] != default:
          raise ConfigError(f"rl.{key}", rl[key], f"only objective.kind='ppo' reads it (leave it at {default!r} "
                            f"with objective.kind={cfg.objective.kind!r})")

  @classmethod
  def from_config(cls, o, rl=None) -> "PolicyGradient":
    if rl is None:
      raise ValueError(f"objective.kind={o.kind!r} is configured by config.rl too: objectives.from_config(o, rl)")
    loss = LossConfig(beta=o.beta, kl_placement=rl.kl_placement, kl_estimator=rl.kl_estimator,
                      loss_type=rl.loss_type, cliprange=rl.cliprange, cliprange_high=rl.cliprange_high,
                      max_new_tokens=rl.max_new_tokens)
    return cls(kind=o.kind, loss_chunk_size=o.loss_chunk_size, beta=o.beta, num_generations=rl.num_generations,
               scale_rewards=rl.scale_rewards, loss_cfg=loss, temperature=rl.temperature, top_k=rl.top_k,
               top_p=rl.top_p, off_policy=rl.epochs * rl.num_minibatches > 1)
