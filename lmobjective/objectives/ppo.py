"""PPO's per-token pieces (issue 27): rewards per token, GAE, whitening and the clipped value loss.

PPO with a critic scores a response token by token: the reward is −β·k1 at every response token
(the KL to the reference, in the reward: the placement whose fixed point is π* ∝ π_ref·exp(r/β))
plus the sequence's score at its last real token; a value V_t (the critic's estimate of the return
from the state before token t) turns rewards into advantages by GAE (Schulman et al. 2016):

    δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   R_t = A_t + V_t (the value target),

with V = 0 and A = 0 after the response's last real token, so padding never enters a return. The
value loss is PPO2's clipped one, ½·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²) per token.

Every function is pure, works on [B,T] arrays where `mask_BxT` marks the response's target positions
(contiguous, as the sampler lays them out), and keeps its dtype, so the float64 tests
(`tests/test_ppo.py`) run the same code.

`PPO` is the objective: the policy-gradient objective (`policy.PolicyGradient`) with per-token
advantages and a value head on the policy (`model.ScoredTransformer`'s score head, read at the
position that predicts each response token: V(s_t) before token t), whose clipped loss joins the
policy's, weighted by `rl.vf_coef` and aggregated as `rl.loss_type` aggregates the policy's. The
rollout (`run/rollout.py`) computes the per-token rewards, the old values and GAE once per iteration.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmobjective.batch import MODEL_FIELDS
from lmobjective.config import ConfigError, require_float
from lmobjective.objectives import interface, policy

WHITEN_EPS = 1e-8  # TRL's masked_whiten


def last_position(mask_BxT: jax.Array) -> jax.Array:
  """[B] the index of each row's last response position (0 for a row without one)."""
  T = mask_BxT.shape[1]
  return jnp.where(mask_BxT.any(axis=1), T - 1 - jnp.argmax(mask_BxT[:, ::-1], axis=1), 0)


def token_rewards(scores_B: jax.Array, kl_BxT: jax.Array, mask_BxT: jax.Array, beta: float) -> jax.Array:
  """[B,T] per-token rewards: −β·kl_t on every response position, + the score on the last one (never
  on padding; a row without a response gets none)."""
  T = mask_BxT.shape[1]
  at_last_BxT = (jnp.arange(T)[None, :] == last_position(mask_BxT)[:, None]) & mask_BxT
  return jnp.where(mask_BxT, -beta * kl_BxT, 0) + jnp.where(at_last_BxT, scores_B[:, None], 0)


def gae(rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """(advantages [B,T], returns [B,T]) by a reverse scan over positions; 0 off the response."""
  mask = mask_BxT.astype(rewards_BxT.dtype)
  r_TxB, v_TxB, m_TxB = rewards_BxT.T * mask.T, values_BxT.T * mask.T, mask.T

  def back(carry, x):
    next_value_B, next_adv_B = carry
    r_B, v_B, m_B = x
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = (delta_B + gamma * lam * next_adv_B) * m_B
    return (v_B, adv_B), adv_B

  zero = jnp.zeros_like(r_TxB[0])
  _, adv_TxB = jax.lax.scan(back, (zero, zero), (r_TxB, v_TxB, m_TxB), reverse=True)
  adv_BxT = adv_TxB.T
  return adv_BxT, (adv_BxT + values_BxT) * mask


def whiten(x_BxT: jax.Array, mask_BxT: jax.Array, shift_mean: bool = True) -> jax.Array:
  """(x − mean)/√(var + 1e-8) over the masked entries (var unbiased, TRL's `masked_whiten`); with
  `shift_mean` False the mean is added back (TRL whitens rewards so). 0 off the mask."""
  m = mask_BxT.astype(x_BxT.dtype)
  n = m.sum()
  mean = (x_BxT * m).sum() / n
  var = (jnp.square(x_BxT - mean) * m).sum() / (n - 1)
  out = (x_BxT - mean) * jax.lax.rsqrt(var + WHITEN_EPS)
  return jnp.where(mask_BxT, out if shift_mean else out + mean, 0)


def value_loss(values_BxT: jax.Array, old_values_BxT: jax.Array, returns_BxT: jax.Array, mask_BxT: jax.Array,
               cliprange_value: float) -> tuple[jax.Array, jax.Array]:
  """(per-token clipped value loss [B,T], per-token 1 where the clipped branch is the larger [B,T]),
  0 off the mask. The caller aggregates them as the policy loss is (`loss_type`)."""
  clipped = old_values_BxT + jnp.clip(values_BxT - old_values_BxT, -cliprange_value, cliprange_value)
  unclipped_loss, clipped_loss = jnp.square(values_BxT - returns_BxT), jnp.square(clipped - returns_BxT)
  loss = 0.5 * jnp.maximum(unclipped_loss, clipped_loss)
  clipfrac = (clipped_loss > unclipped_loss).astype(values_BxT.dtype)
  return jnp.where(mask_BxT, loss, 0), jnp.where(mask_BxT, clipfrac, 0)


def explained_variance(values_BxT: jax.Array, returns_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """1 − Var(R − V)/Var(R) over the masked entries (population variances): 1 for a critic that
  predicts every return, 0 for one no better than the returns' mean, negative for one worse than it;
  NaN when the returns do not vary (TRL's PPOTrainer logged it as `ppo/val/var_explained`)."""
  m = mask_BxT.astype(returns_BxT.dtype)
  n = jnp.maximum(m.sum(), 1)
  var = lambda x: (jnp.square(x - (x * m).sum() / n) * m).sum() / n
  var_r = var(returns_BxT)
  return jnp.where(var_r > 0, 1 - var(returns_BxT - values_BxT) / jnp.where(var_r > 0, var_r, 1), jnp.nan)


# ---- the objective ---------------------------------------------------------------------------------


class ValueSums(NamedTuple):
  """The value loss's sums over one microbatch (they add), weighted per row as the policy loss is."""
  value_sum: jax.Array  # Σ_rows w_row·Σ_t ½max(...) (loss/value_avg once divided)
  value_clipped_tokens: jax.Array  # tokens where the clipped branch was the larger (val/clipfrac_avg)
  value_pred_sum: jax.Array  # Σ V over response tokens


def values(model, params, batch: dict, deterministic: bool = True, rngs=None, h_BxTxD=None) -> jax.Array:
  """[B,T] V(s_t) at every position whose target is a response token (0 elsewhere), float32; from the
  batch's final hidden states `h_BxTxD` when given (the policy's forward, shared)."""
  if h_BxTxD is None:
    h_BxTxD = hidden_states(model, params, batch, deterministic, rngs)
  return jnp.where(batch["loss_mask"], model.apply({"params": params}, h_BxTxD, method="score_of"), 0.0)


def hidden_states(model, params, batch: dict, deterministic: bool = True, rngs=None) -> jax.Array:
  """[B,T,D] the final hidden states both heads read: one backbone pass for the policy and its critic."""
  return model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                     deterministic=deterministic, rngs=rngs, method="hidden_states")


@dataclasses.dataclass(frozen=True)
class PPO(policy.PolicyGradient):
  """PPO with a value head on the policy: per-token advantages (GAE) in the clipped surrogate, plus
  `vf_coef` times the clipped value loss."""
  kind: str = "ppo"
  cliprange_value: float = 0.2
  vf_coef: float = 0.1

  scored: ClassVar[bool] = True

  @property
  def fields(self) -> tuple[str, ...]:
    return (MODEL_FIELDS + (policy.ADVANTAGES, policy.OLD_VALUES, policy.RETURNS)
            + ((policy.OLD_LOGPS,) if self.off_policy else ()))

  def _both(self, model, params, batch, deterministic=True, rngs=None):
    h_BxTxD = hidden_states(model, params, batch, deterministic, rngs)  # one backbone pass, both heads
    sums = self._sums(model, params, batch, deterministic, rngs, h_BxTxD)
    mask = batch["loss_mask"]
    v_BxT = values(model, params, batch, h_BxTxD=h_BxTxD)
    loss_BxT, clipped_BxT = value_loss(v_BxT, batch[policy.OLD_VALUES], batch[policy.RETURNS], mask,
                                       self.cliprange_value)
    w_B = policy.row_weights(mask, self.loss_cfg.loss_type, v_BxT.dtype)
    vs = ValueSums(value_sum=(w_B * loss_BxT.sum(axis=-1)).sum(),
                   value_clipped_tokens=clipped_BxT.sum().astype(jnp.int32),
                   value_pred_sum=jax.lax.stop_gradient(v_BxT.sum()))
    return sums._replace(loss_sum=sums.loss_sum + self.vf_coef * vs.value_sum), vs

  def loss(self, model, params, micro, rng, reference_params, deterministic):  # noqa: D102
    sums, vs = self._both(model, params, micro, deterministic, None if deterministic else {"dropout": rng})
    return sums.loss_sum, (sums, vs)

  def denominator(self, sums):
    return policy.denominator(sums[0], self.loss_cfg)

  def step_metrics(self, sums):
    pg, vs = sums
    den = jnp.maximum(self.denominator(sums), 1).astype(jnp.float32)
    return {"loss": pg.loss_sum / den, "pg_loss": pg.pg_sum / den, **pg._asdict(), "value_loss": vs.value_sum / den,
            **vs._asdict()}

  def eval_sums(self, model, params, batch, reference_params, token_bytes_V):
    return self._both(model, params, batch)

  def eval_record(self, per_source):
    total = None
    for pg, _ in per_source.values():
      total = interface.add(total, pg)
    return {} if total is None else {"val_loss": float(total.loss_sum / max(policy.denominator(total, self.loss_cfg), 1))}

  def train_record(self, metrics):
    """The policy's, plus loss/value_avg and val/clipfrac_avg (TRL's names)."""
    tokens = max(interface.window_sum(metrics, "num_tokens"), 1)
    return {**super().train_record(metrics),
            "loss/value_avg": float(np.mean([np.float64(m["value_loss"]) for m in metrics])),
            "val/clipfrac_avg": interface.window_sum(metrics, "value_clipped_tokens") / tokens,
            "val/value_mean": interface.window_sum(metrics, "value_pred_sum") / tokens}

  @classmethod
  def validate(cls, cfg) -> None:
    super().validate(cfg)
    rl = cfg.rl
    require_float(cfg, "rl.gamma", 0.0, 1.0)
    require_float(cfg, "rl.lam", 0.0, 1.0)
    require_float(cfg, "rl.cliprange_value", 0.0, lo_open=True)
    require_float(cfg, "rl.vf_coef", 0.0)
    if not isinstance(rl.whiten_advantages, bool):
      raise ConfigError("rl.whiten_advantages", rl.whiten_advantages, "must be True or False")
    if cfg.objective.beta > 0 and (rl.kl_placement, rl.kl_estimator) != ("reward", "k1"):
      raise ConfigError("rl.kl_placement", rl.kl_placement, f"objective.kind='ppo' puts −β·k1 in the reward at every "
                        f"token (rl.kl_placement='reward', rl.kl_estimator='k1'), not {rl.kl_estimator!r} in the "
                        f"{rl.kl_placement}")

  @classmethod
  def from_config(cls, o, rl=None) -> "PPO":
    base = policy.PolicyGradient.from_config(o, rl)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(policy.PolicyGradient)}
    return cls(**{**fields, "kind": o.kind}, cliprange_value=rl.cliprange_value, vf_coef=rl.vf_coef)
