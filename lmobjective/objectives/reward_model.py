"""The reward model's loss (Bradley–Terry on preference pairs) as sums over pairs.

A reward model scores a whole response: r(x, y) is one number, the score head applied to the hidden
state of the last real token of prompt + response. On a pair (y_w chosen over y_l) the loss is
TRL's `RewardTrainer`'s,

    loss = −log σ(r_w − r_l − m) + c·(r_w + r_l)²,

m the pair's margin (0 unless the data gives one) and c `center_rewards_coefficient` (0: off), which
pins the free constant of a Bradley–Terry fit (r and r + k give the same likelihood) near 0.
`RewardSums` add across microbatches, devices and hosts, except `min_reward` and `max_reward`, which
combine by min and max (`combine`). Padding pairs add nothing and get no gradient.

Shape legend: P pairs.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmobjective.batch import MARGIN, MODEL_FIELDS
from lmobjective.config import require_float
from lmobjective.objectives import interface, preference


class RewardSums(NamedTuple):
  """Sums over valid pairs; combine them (`combine`) across microbatches, then `summarize`."""
  loss_sum: jax.Array
  num_pairs: jax.Array  # int32
  accuracy_sum: jax.Array  # r_w > r_l, a tie counted half -> accuracy
  margin_sum: jax.Array  # r_w − r_l -> margin
  reward_sum: jax.Array  # r_w + r_l (both responses) -> mean_reward
  min_reward: jax.Array  # min over both responses of the valid pairs (+inf with none)
  max_reward: jax.Array  # max over them (−inf with none)


def bradley_terry(chosen_P: jax.Array, rejected_P: jax.Array, valid_P: jax.Array, *, margin_P: jax.Array | None = None,
                  center_coefficient: float = 0.0) -> RewardSums:
  """`RewardSums` of P pairs' rewards r_w (`chosen_P`) and r_l (`rejected_P`); `valid_P` false on padding."""
  if center_coefficient < 0:
    raise ValueError(f"center_coefficient must be >= 0, got {center_coefficient}")
  valid_P = valid_P.astype(bool)
  zero = lambda x: jnp.where(valid_P, x, jnp.zeros_like(x))
  chosen_P, rejected_P = zero(chosen_P), zero(rejected_P)  # nothing non-finite reaches a gradient
  diff_P = chosen_P - rejected_P - (0.0 if margin_P is None else zero(margin_P.astype(chosen_P.dtype)))
  loss_P = -jax.nn.log_sigmoid(diff_P) + center_coefficient * jnp.square(chosen_P + rejected_P)
  metric = lambda x: jax.lax.stop_gradient(zero(x).sum())
  both_Px2 = jax.lax.stop_gradient(jnp.stack([chosen_P, rejected_P], axis=-1))
  inf = jnp.asarray(jnp.inf, chosen_P.dtype)
  return RewardSums(
      loss_sum=zero(loss_P).sum(), num_pairs=valid_P.sum(dtype=jnp.int32),
      accuracy_sum=metric((chosen_P > rejected_P).astype(chosen_P.dtype) + 0.5 * (chosen_P == rejected_P)),
      margin_sum=metric(chosen_P - rejected_P), reward_sum=metric(chosen_P + rejected_P),
      min_reward=jnp.where(valid_P[:, None], both_Px2, inf).min(),
      max_reward=jnp.where(valid_P[:, None], both_Px2, -inf).max())


def combine(a: RewardSums, b: RewardSums, *, xp=jnp) -> RewardSums:
  """Two `RewardSums` as one (device arrays; `xp=np` on the host): sums add, the extremes take min/max."""
  added = RewardSums(*(x + y for x, y in zip(a, b)))
  return added._replace(min_reward=xp.minimum(a.min_reward, b.min_reward),
                        max_reward=xp.maximum(a.max_reward, b.max_reward))


def summarize(sums: RewardSums) -> dict[str, float]:
  """TRL's `RewardTrainer` metrics over the valid pairs: loss, accuracy, margin, {min,mean,max}_reward."""
  n = int(sums.num_pairs)
  if n == 0:
    return {"loss": float("nan"), "num_pairs": 0}
  mean = lambda x: float(x) / n
  return {"loss": mean(sums.loss_sum), "accuracy": mean(sums.accuracy_sum), "margin": mean(sums.margin_sum),
          "min_reward": float(sums.min_reward), "mean_reward": float(sums.reward_sum) / (2 * n),
          "max_reward": float(sums.max_reward), "num_pairs": n}


def host_combine(a: RewardSums | None, b: RewardSums) -> RewardSums:
  """`combine` on host float64 values (None is the empty set)."""
  return b if a is None else combine(a, b, xp=np)


def last_scored_position(loss_mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(index [B] of each row's last scored target position, whether the row has one [B])."""
  T = loss_mask_BxT.shape[1]
  has_B = loss_mask_BxT.any(axis=1)
  return T - 1 - jnp.argmax(loss_mask_BxT[:, ::-1], axis=1), has_B


def with_final_token(batch: dict) -> tuple[dict, jax.Array, jax.Array]:
  """(the batch with each row's last response token also placed as an input, the position to read [B], whether
  the row has a response [B]).

  Rows are teacher-forced (inputs = tokens[:-1]), so a response's last token, its terminator (EOS, or
  <|end|> in a chat) or the last token of a truncated sample, may be a target only. The reward is read
  where that token is an input: the hidden state of the last real token of prompt + response, as
  TRL's reward models read it. Pair rows already hold it (a document's last token is the row's last
  input, its target padding); a sampled row gets it in the padding slot after it (its position one
  on, its document's segment). A row cut by the context has no such slot: it is read at its last
  scored position (it has seen every token but the last)."""
  mask_BxT = batch["loss_mask"]
  T = mask_BxT.shape[1]
  last_B, has_B = last_scored_position(mask_BxT)
  at = lambda x_BxT, i_B: jnp.take_along_axis(x_BxT, i_B[:, None], axis=1)[:, 0]
  next_B = jnp.minimum(last_B + 1, T - 1)
  fits_B = has_B & (last_B + 1 < T)
  final_B, segment_B = at(batch["targets"], last_B), at(batch["segment_ids"], last_B)
  present_B = fits_B & (at(batch["segment_ids"], next_B) == segment_B) & (at(batch["inputs"], next_B) == final_B)
  room_B = fits_B & (at(batch["segment_ids"], next_B) == 0)
  slot_BxT = room_B[:, None] & (jnp.arange(T)[None, :] == next_B[:, None])
  put = lambda x_BxT, v_B: jnp.where(slot_BxT, v_B[:, None].astype(x_BxT.dtype), x_BxT)
  out = {**batch, "inputs": put(batch["inputs"], final_B),
         "positions": put(batch["positions"], at(batch["positions"], last_B) + 1),
         "segment_ids": put(batch["segment_ids"], segment_B)}
  return out, jnp.where(present_B | room_B, next_B, last_B), has_B


def row_rewards(model, params, batch: dict, deterministic: bool = True, rngs=None) -> tuple[jax.Array, jax.Array]:
  """(r [B] float32, has a response [B]): the score head at each row's last real token (`with_final_token`)."""
  full, read_B, has_B = with_final_token(batch)
  values_BxT = model.apply({"params": params}, full["inputs"], full["positions"], full["segment_ids"],
                           deterministic=deterministic, rngs=rngs, method="score")
  return jnp.take_along_axis(values_BxT, read_B[:, None], axis=1)[:, 0], has_B


@dataclasses.dataclass(frozen=True)
class RewardModel(interface.Objective):
  """Bradley–Terry on preference pairs (`bradley_terry`): a group is one pair's two rows, the gradient's
  denominator the batch's valid pairs (both rows hold a response and differ), the metrics TRL's."""
  kind: str = "reward_model"
  center_rewards_coefficient: float = 0.0

  group_size: ClassVar[int] = 2
  examples: ClassVar[str] = "pairs"
  per_token: ClassVar[bool] = False
  scored: ClassVar[bool] = True
  keys: ClassVar[tuple[str, ...]] = ("center_rewards_coefficient",)

  @classmethod
  def validate(cls, cfg) -> None:
    require_float(cfg, "objective.center_rewards_coefficient", 0.0)

  @property
  def fields(self) -> tuple[str, ...]:
    return MODEL_FIELDS + (MARGIN,)

  def _sums(self, model, params, batch, deterministic=True, rngs=None) -> RewardSums:
    r_B, has_B = row_rewards(model, params, batch, deterministic, rngs)
    r_Px2, has_Px2 = r_B.reshape(-1, 2), has_B.reshape(-1, 2)
    valid_P = has_Px2.all(axis=1) & preference.distinct_rows(batch)
    margin_P = batch[MARGIN][0::2] if MARGIN in batch else None  # both rows of a pair carry it
    return bradley_terry(r_Px2[:, 0], r_Px2[:, 1], valid_P, margin_P=margin_P,
                         center_coefficient=self.center_rewards_coefficient)

  def loss(self, model, params, micro, rng, reference_params, deterministic):
    sums = self._sums(model, params, micro, deterministic, None if deterministic else {"dropout": rng})
    return sums.loss_sum, (sums, micro["loss_mask"].sum(dtype=jnp.int32))

  def combine(self, a, b):
    return combine(a[0], b[0]), a[1] + b[1]

  def empty(self, zeros):
    sums, n = zeros
    return sums._replace(min_reward=jnp.full_like(sums.min_reward, jnp.inf),
                         max_reward=jnp.full_like(sums.max_reward, -jnp.inf)), n

  def denominator(self, sums):
    return sums[0].num_pairs

  def step_metrics(self, sums):
    rm, num_tokens = sums
    return {"loss": rm.loss_sum / jnp.maximum(rm.num_pairs, 1).astype(jnp.float32), **rm._asdict(),
            "num_tokens": num_tokens}

  def eval_sums(self, model, params, batch, reference_params, token_bytes_V):
    return self._sums(model, params, batch)

  def add_host(self, a, b):
    return host_combine(a, b)

  def eval_record(self, per_source):
    """val_loss, val_accuracy, val_margin, val_{min,mean,max}_reward over the held-out pairs, and
    val_loss/<source>, val_accuracy/<source>."""
    out, total = {}, None
    for name, sums in per_source.items():
      m = summarize(sums)
      out[f"val_loss/{name}"], out[f"val_accuracy/{name}"] = m["loss"], m.get("accuracy", float("nan"))
      total = host_combine(total, sums)
    if total is not None:
      out.update({f"val_{k}": v for k, v in summarize(total).items()})
    return out

  def train_record(self, metrics):
    """train_loss and TRL's accuracy, margin, {min,mean,max}_reward over the window's pairs."""
    sums = RewardSums(*(interface.window_sum(metrics, k) for k in RewardSums._fields))
    sums = sums._replace(min_reward=min(float(m["min_reward"]) for m in metrics),
                         max_reward=max(float(m["max_reward"]) for m in metrics))
    m = summarize(sums)
    return {"train_loss": m.pop("loss"), **m}
