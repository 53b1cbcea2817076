"""The distribution a sampler draws from and a trainer scores: one function for both sides.

`logps(logits, cfg)` is temperature, then top-k, then top-p (the smallest set of most likely ids
whose mass reaches top_p), renormalised by one log-softmax. The sampler (`lmobjective/sampling.py`)
draws from it and reports the drawn id's log-prob under it; a trainer scoring the same tokens
(`score`, the policy-gradient objectives) calls the same function, so the two sides cannot disagree
on temperature or truncation (TRL's users hit both). At temperature 1 without truncation it is
`log_softmax(logits)`, what `next_token.score` computes. Temperature 0 (greedy) reports log-probs at
temperature 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lmobjective.objectives import next_token


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """What to sample (static: one compiled program per setting). Checked when built, one line per error."""
  max_new_tokens: int
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # keep the k most likely ids (0 = all)
  top_p: float = 1.0  # keep the smallest set of most likely ids whose probability reaches top_p
  stop_ids: tuple[int, ...] = ()  # a row ends at the first of these it samples (kept in its response)
  pad_id: int = 0  # what fills a stopped row's later slots

  def __post_init__(self):
    object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
    bad = _first_bad(self)
    if bad:
      raise ValueError(bad)


def _first_bad(cfg: SamplingConfig) -> str | None:
  if not isinstance(cfg.max_new_tokens, (int, np.integer)) or cfg.max_new_tokens < 1:
    return f"max_new_tokens={cfg.max_new_tokens!r}: must be a positive integer"
  if not cfg.temperature >= 0:  # also refuses NaN
    return f"temperature={cfg.temperature!r}: must be >= 0 (0 = greedy)"
  if not 0 < cfg.top_p <= 1:
    return f"top_p={cfg.top_p!r}: must be in (0, 1] (1 = no nucleus truncation)"
  if not isinstance(cfg.top_k, (int, np.integer)) or cfg.top_k < 0:
    return f"top_k={cfg.top_k!r}: must be an integer >= 0 (0 = no top-k truncation)"
  return None


def logps(logits_xV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """float32 log-probs [..., V] of the distribution `cfg` samples from: logits / temperature, top-k,
  top-p, one log-softmax (-inf outside the kept ids). Temperature 0: log_softmax(logits)."""
  logits_xV = logits_xV.astype(jnp.float32)
  if cfg.temperature == 0:
    return jax.nn.log_softmax(logits_xV, axis=-1)
  logits_xV = logits_xV / cfg.temperature
  if cfg.top_k and cfg.top_k < logits_xV.shape[-1]:
    kth_x1 = jax.lax.top_k(logits_xV, cfg.top_k)[0][..., -1:]
    logits_xV = jnp.where(logits_xV < kth_x1, -jnp.inf, logits_xV)
  if cfg.top_p < 1:  # the cutoff is one of the logits themselves, so the comparison is exact
    sorted_xV = -jnp.sort(-logits_xV, axis=-1)  # most likely first
    p_xV = jax.nn.softmax(sorted_xV, axis=-1)
    before_xV = jnp.cumsum(p_xV, axis=-1) - p_xV  # mass of the strictly more likely ids
    kept_x = jnp.maximum((before_xV < cfg.top_p).sum(axis=-1), 1)
    cutoff_x1 = jnp.take_along_axis(sorted_xV, kept_x[..., None] - 1, axis=-1)
    logits_xV = jnp.where(logits_xV < cutoff_x1, -jnp.inf, logits_xV)
  return jax.nn.log_softmax(logits_xV, axis=-1)


def score(model, params, batch: dict, cfg: SamplingConfig, *, chunk_size: int = 0,
          deterministic: bool = True, rngs=None, h_BxTxD=None):
  """`next_token.score` of the distribution `cfg` samples from (`logps` of the head's logits): what a
  trainer computes for tokens this sampler drew (at temperature 1 without truncation, the same
  numbers as `next_token.score`). `TokenLosses`; `-nll` is each target's log-prob. `h_BxTxD`: the
  batch's final hidden states when the caller already has them (one backbone pass, two heads)."""
  variables = {"params": params}
  if h_BxTxD is None:
    h_BxTxD = model.apply(variables, batch["inputs"], batch["positions"], batch["segment_ids"],
                          deterministic=deterministic, rngs=rngs, method="hidden_states")
  head = lambda h: logps(model.apply(variables, h, method="head"), cfg)
  return next_token.head_token_losses(head, h_BxTxD, batch["targets"], batch.get("loss_mask"), chunk_size)
