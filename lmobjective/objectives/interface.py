"""What every objective declares, so that one train step, one eval step and one loop serve them all.

An objective is a frozen dataclass built from `config.objective` (`objectives.from_config`). It
declares:

  fields          the batch fields its loss reads (`batch.MODEL_FIELDS`, plus e.g. a cached
                  reference's log-probs);
  group_size      how many consecutive rows belong together (1 for tokens, 2 for a pair, k for k
                  samples of one prompt): a group is never split across microbatches or devices;
  loss            on one microbatch: (the value to differentiate, sums), where the value is a
                  *sum* over the microbatch and every entry of sums adds across microbatches,
                  devices and hosts;
  denominator     which count in the sums the summed gradient is divided by, once per step
                  (scored tokens, valid pairs, ...);
  step_metrics    the device-side metrics of a train step (sums and counts, so the host can
                  weight a window of steps);
  eval_sums       the sums of one eval batch; `eval_record` turns each source's added sums into
                  the logged val_* metrics, `train_record` a window of steps' metrics into the
                  train line (TRL's names where they exist);
  needs_reference whether a frozen reference model takes part;
  keys            the `objective.*` keys it reads, which `validate` checks. A key it does not read
                  must keep its neutral value (NEUTRAL): a knob that would be ignored is refused.

Nothing outside `objectives/` tests `objective.kind` or the names of an objective's metrics.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lmobjective.batch import MODEL_FIELDS
from lmobjective.config import ConfigError

# The value each `objective.*` key has when it is not set (configs/default.py); an objective that
# does not read a key refuses any other value. loss_chunk_size and kind are read by every objective.
NEUTRAL: Mapping[str, Any] = {"beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.0, "rpo_alpha": 0.0,
                              "z_loss": 0.0, "reference": "cached", "center_rewards_coefficient": 0.0}


@dataclasses.dataclass(frozen=True)
class Objective(abc.ABC):
  """One training objective (see the module docstring for each declaration)."""
  kind: str
  loss_chunk_size: int = 0  # > 0: the LM head fused with the loss in chunks of this many positions

  group_size: ClassVar[int] = 1
  examples: ClassVar[str] = "tokens"  # what its data sources hold: "tokens" (documents, chats) or "pairs"
  keys: ClassVar[tuple[str, ...]] = ()  # objective.* keys it reads, besides kind and loss_chunk_size
  per_token: ClassVar[bool] = True  # its loss is a mean over scored tokens (loss by position applies)
  scored: ClassVar[bool] = False  # its model has a score head (`model.ScoredTransformer`: a reward model)

  @property
  def needs_reference(self) -> bool:
    return False

  @property
  def cached_reference(self) -> bool:
    """The frozen reference's values come with the batches (precomputed), not from a forward."""
    return False

  @property
  def fields(self) -> tuple[str, ...]:
    return MODEL_FIELDS

  @abc.abstractmethod
  def loss(self, model, params, micro: dict, rng, reference_params, deterministic: bool) -> tuple[jax.Array, Any]:
    """(value to differentiate, a sum over the microbatch; sums that add across microbatches)."""

  @abc.abstractmethod
  def denominator(self, sums) -> jax.Array:
    """The count the step's summed gradient is divided by."""

  @abc.abstractmethod
  def step_metrics(self, sums) -> dict[str, jax.Array]:
    """A train step's metrics from its sums: `loss` (this step's mean, which the NaN guard reads) and
    `num_tokens` (scored tokens) at least."""

  @abc.abstractmethod
  def eval_sums(self, model, params, batch: dict, reference_params, token_bytes_V) -> Any:
    """The sums of one eval batch (deterministic forward)."""

  @abc.abstractmethod
  def eval_record(self, per_source: Mapping[str, Any]) -> dict[str, float]:
    """val_* metrics from each source's eval sums (host float64 pytrees, added over its batches)."""

  @abc.abstractmethod
  def train_record(self, metrics: list[dict]) -> dict[str, float]:
    """The objective's part of a train line (train_loss, ...) over a window of steps' host metrics."""

  def combine(self, a, b):
    """Two microbatches' sums as one, inside the step: added (an objective whose sums hold an extreme,
    a minimum say, overrides this and `empty` together)."""
    return jax.tree.map(jnp.add, a, b)

  def empty(self, zeros):
    """The sums `combine` starts from, given zeros shaped like them: the zeros."""
    return zeros

  def add_host(self, a, b):
    """Two eval batches' host sums (float64) as one; None is the empty set."""
    return add(a, b)

  @classmethod
  def updates_per_step(cls, cfg) -> int:
    """Optimizer updates per train step (`cfg` the whole config): 1, or an RL iteration's epochs x minibatches."""
    return 1

  def restored_metrics(self, metrics: dict) -> dict:
    """A pending step's metrics as an older checkpoint saved them, in today's form (default: as they are)."""
    return metrics

  def settings(self) -> str:
    """`objective.kind=...` and every key it reads, for error messages (a run that dies names them)."""
    return ", ".join([f"objective.kind={self.kind!r}"] + [f"objective.{k}={getattr(self, k)!r}" for k in self.keys])

  @classmethod
  def validate(cls, cfg) -> None:
    """Checks the keys this objective reads (`cfg` the whole ConfigDict); raises `ConfigError`."""

  @classmethod
  def from_config(cls, o) -> "Objective":
    """From `config.objective` (typed or a ConfigDict)."""
    return cls(kind=o.kind, loss_chunk_size=o.loss_chunk_size, **{k: getattr(o, k) for k in cls.keys})


def refuse_unread(cls: type[Objective], cfg) -> None:
  """A key of `config.objective` that `cls` does not read must keep its neutral value (one line)."""
  o, kind = cfg.objective, cfg.objective.kind
  for key, neutral in NEUTRAL.items():
    if key not in cls.keys and o[key] != neutral:
      raise ConfigError(f"objective.{key}", o[key], f"objective.kind={kind!r} does not read it (leave it at "
                        f"{neutral!r}); {readers_hint(key)}")


READERS: dict[str, list[str]] = {}  # objective.* key -> the kinds that read it (filled by the registry)


def readers_hint(key: str) -> str:
  kinds = READERS.get(key, [])
  if not kinds:
    return "no objective reads it"
  return f"it applies to objective.kind {' or '.join(kinds)}" if len(kinds) < 3 else \
      f"it applies to objective.kind {', '.join(kinds[:-1])} or {kinds[-1]}"


def host_sums(sums) -> Any:
  """A device pytree of sums as float64 NumPy (add these across batches on the host)."""
  return jax.tree.map(np.float64, jax.device_get(sums))


def add(a, b):
  """Two host pytrees of sums added (None is the empty sum)."""
  return b if a is None else jax.tree.map(np.add, a, b)


def window_sum(metrics: list[dict], key: str) -> float:
  """float64 sum of one metric over a window of steps."""
  return float(np.sum([np.float64(m[key]) for m in metrics]))
