"""The objectives, one module per family, behind one interface (`interface.Objective`).

    objective = objectives.from_config(config.objective)   # e.g. preference.DPO(beta=0.1, ...)

`OBJECTIVES` maps `objective.kind` to its class; this is the one place a kind is looked up.
next_token.py  masked next-token cross-entropy (pretraining; SFT through the loss mask), and the
               one way from a model to its per-token losses and per-sequence log-probs
preference.py  DPO, IPO, SimPO (+ RPO's NLL term) on pairs, against a frozen reference or none
policy.py      RLOO, GRPO, REINFORCE on sampled responses (reward maximisation; `run/rollout.py` samples)
reward_model.py  a reward model (a score head) fitted to preference pairs by Bradley–Terry
ppo.py         PPO: a value head on the policy, rewards per token, GAE, whitening, the clipped value loss
"""

from __future__ import annotations

from lmobjective.config import require_choice, require_int
from lmobjective.objectives import interface, next_token, policy, ppo, preference, reward_model
from lmobjective.objectives.interface import Objective

OBJECTIVES: dict[str, type[Objective]] = {
    "next_token": next_token.NextToken,
    "dpo": preference.DPO,
    "ipo": preference.IPO,
    "simpo": preference.SimPO,
    "rloo": policy.PolicyGradient,
    "grpo": policy.PolicyGradient,
    "reinforce": policy.PolicyGradient,
    "ppo": ppo.PPO,
    "reward_model": reward_model.RewardModel,
}
KINDS = tuple(OBJECTIVES)
for _kind, _cls in OBJECTIVES.items():
  for _key in _cls.keys:
    interface.READERS.setdefault(_key, []).append(_kind)


def from_config(o, rl=None) -> Objective:
  """The objective `config.objective` declares (typed section or ConfigDict; validated); reward
  maximisation reads `config.rl` too."""
  cls = OBJECTIVES[o.kind]
  return cls.from_config(o, rl) if issubclass(cls, policy.PolicyGradient) else cls.from_config(o)


def model_class(kind: str):
  """The model objective `kind` trains: `Transformer`, or `ScoredTransformer` (a score head) for a reward model."""
  from lmobjective.model import ScoredTransformer, Transformer
  return ScoredTransformer if OBJECTIVES[kind].scored else Transformer


def updates_per_step(cfg) -> int:
  """Optimizer updates per train step of `cfg`'s objective (several per RL iteration)."""
  return OBJECTIVES[cfg.objective.kind].updates_per_step(cfg)


def samples_prompts(cfg) -> bool:
  """The objective learns from responses it samples to prompts (reward maximisation: `run/rollout.py`)."""
  return OBJECTIVES[cfg.objective.kind].examples == "prompts"


def unread_keys(kind: str | None) -> tuple[str, ...]:
  """The `objective.*` keys (of `interface.NEUTRAL`) that objective `kind` does not read (all, if unknown)."""
  reads = OBJECTIVES[kind].keys if kind in OBJECTIVES else ()
  return tuple(k for k in interface.NEUTRAL if k not in reads)


def neutralised(config: dict) -> dict:
  """A config.json dict with the `objective.*` keys its objective does not read at their neutral values
  (an older run may carry another value where it changed nothing, e.g. `reference` "live" before the
  key existed); the keys it reads are left as they are."""
  o = config.get("objective", {})
  for key in unread_keys(o.get("kind")):
    if key in o:
      o[key] = interface.NEUTRAL[key]
  return config


def validate(cfg) -> type[Objective]:
  """`config.objective`: a known kind, the keys that kind reads, and every other key at its neutral value.
  Returns the objective's class (what it declares: `examples`, `group_size`, ...)."""
  require_choice(cfg, "objective.kind", KINDS)
  require_int(cfg, "objective.loss_chunk_size", 0)
  cls = OBJECTIVES[cfg.objective.kind]
  cls.validate(cfg)
  interface.refuse_unread(cls, cfg)
  return cls


__all__ = ["KINDS", "OBJECTIVES", "Objective", "from_config", "model_class", "neutralised", "samples_prompts", "unread_keys",
           "updates_per_step", "validate"]
