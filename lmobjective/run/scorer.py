"""A reward model as an RL stage's reward: `rl.reward_model = RM_WORKDIR` (a run of objective.kind=reward_model).

`load` reads it once, while the RL run is built and before anything is written: the newest readable
checkpoint, the reward model's own `model.*` (it may differ from the policy's), its params placed on
the RL mesh. It scores the sampled rows' ids directly, never re-encoded text, at each response's last
scored position as it was trained (`objectives.reward_model.row_rewards`), so its tokenizer must be
the policy's (same fingerprint: the same ids), refused in one line otherwise. It is recorded
(`record()`) in every RL checkpoint; a resumed run refuses one whose params changed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from lmobjective import config as config_lib
from lmobjective import objectives, sharding, step, validation
from lmobjective.config import ConfigError
from lmobjective.data import tokenizers
from lmobjective.model import ModelConfig, ScoredTransformer
from lmobjective.objectives import reward_model
from lmobjective.run import checkpoint as ckpt_lib
from lmobjective.run import stage

KEY = "rl.reward_model"
TERM = "reward_model"  # its metric name (rewards/reward_model/mean) and its place in rl.reward_weights (last)


@dataclasses.dataclass(frozen=True, eq=False)
class RewardModelScorer:
  workdir: str
  step: int
  params_fingerprint: str
  params: Any
  program: sharding.Program  # (params, rows) -> r [B]
  mesh: Any

  def __call__(self, rows: dict[str, np.ndarray]) -> np.ndarray:
    """float64 [B]: the reward of each sampled row (`inputs`, `targets`, `loss_mask`, `positions`, `segment_ids`)."""
    fields = {k: rows[k] for k in ("inputs", "targets", "loss_mask", "positions", "segment_ids")}
    return np.asarray(jax.device_get(self.program(self.params, sharding.global_batch(fields, self.mesh))), np.float64)

  def record(self) -> dict:
    return {"workdir": self.workdir, "step": self.step, "params_fingerprint": self.params_fingerprint}


def load(spec: str, mesh, tokenizer, context_length: int) -> RewardModelScorer:
  """The reward model of `rl.reward_model` on `mesh`, for rows of `context_length` tokens (one-line ConfigError)."""
  workdir = os.path.abspath(os.path.expanduser(spec))
  if not ckpt_lib.finalized_steps(workdir):
    raise ConfigError(KEY, spec, f"{workdir} holds no checkpoint (train one with objective.kind=reward_model)")
  mngr = ckpt_lib.make_manager(workdir, read_only=True)
  try:
    found = ckpt_lib.latest_config(mngr)
  finally:
    mngr.close()
  if found is None:
    raise ConfigError(KEY, spec, f"{workdir} has no readable checkpoint")
  config = ml_collections.ConfigDict(config_lib.with_added_keys(found[1]))
  kind = config.objective.kind
  if kind not in objectives.OBJECTIVES or not objectives.OBJECTIVES[kind].scored:
    raise ConfigError(KEY, spec, f"is not a reward model: its run has objective.kind={kind!r} (train one with "
                      "objective.kind=reward_model)")
  tok, _ = tokenizers.load(os.path.join(workdir, "tokenizer"), key=KEY)
  if tok.fingerprint() != tokenizer.fingerprint():
    raise ConfigError(KEY, spec, f"uses another tokenizer (fingerprint {tok.fingerprint()}, the policy's "
                      f"{tokenizer.fingerprint()}): it scores ids, and these ids would not be its tokens")
  model_cfg = ModelConfig.from_config(config.model, tok.vocab_size, config.data.context_length)
  if model_cfg.position == "learned" and model_cfg.max_len < context_length:
    raise ConfigError(KEY, spec, f"its model has {model_cfg.max_len} learned positions, fewer than the RL rows' "
                      f"data.context_length={context_length}")
  try:
    validation.check_mesh_divides(dict(mesh.shape), validation.sharded_dims(config.model, tok.vocab_size))
  except ConfigError as e:
    raise ConfigError(KEY, spec, f"its model does not fit the mesh: {str(e).removeprefix('config.')}") from None
  model = ScoredTransformer(model_cfg)
  with sharding.activate(mesh):
    shardings = sharding.param_shardings(model, mesh, (1, context_length))
    shapes = jax.eval_shape(functools.partial(step.init_params, model, batch_shape=(1, context_length)),
                            jax.random.key(0))
  got, params, _, _ = ckpt_lib.restore_params(workdir, None, sharding.abstract_state(shapes, shardings))
  program = sharding.Program(lambda p, rows: reward_model.row_rewards(model, p, rows)[0], mesh,
                             out_shardings=sharding.replicated(mesh))
  return RewardModelScorer(workdir, got, stage.params_fingerprint(params), params, program, mesh)


def check_resumed(scorer: RewardModelScorer | None, recorded: dict | None, step_: int) -> None:
  """A resumed RL run scores with the reward model it started with (its params, by fingerprint)."""
  if recorded is None and scorer is None:
    return
  if scorer is None or recorded is None:
    raise ConfigError(KEY, scorer.workdir if scorer else None, f"the checkpoint at update {step_} was "
                      f"{'not ' if recorded is None else ''}scored by a reward model: resuming would change its reward")
  if recorded["params_fingerprint"] != scorer.params_fingerprint:
    raise ConfigError(KEY, scorer.workdir, f"its params (step {scorer.step}, sha256 {scorer.params_fingerprint}) are "
                      f"not those the checkpoint at update {step_} was scored with ({recorded['workdir']} step "
                      f"{recorded['step']}, sha256 {recorded['params_fingerprint']}): use a new workdir")
