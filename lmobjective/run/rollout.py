"""Reward maximisation's loop (objective.kind rloo | grpo | reinforce): sample, score, update.

Iteration i (train.steps counts them) takes train.batch_size prompts (`prompts.PromptOrder`, a pure
function of i), samples rl.num_generations responses to each with the sampler (row r of the
iteration seeded by fold_in(key(seed), i, r): a resumed run draws the same tokens), decodes them
without the prompt and the terminator, and scores them with the reward functions on the host. One
forward of the policy (the "old" log-probs, at the sampling distribution) and one of the frozen
reference (at rl.temperature, no top-k/top-p) per iteration give the KL terms; the advantages
follow (`objectives.policy`), then rl.epochs × rl.num_minibatches updates through the generic step,
each on whole groups. state.step, warmup and decay count updates. The loop around one iteration
(checkpoints, resume, logging) is `run/rl_loop.py`.

Metrics (docs/metrics.md) use TRL's names where TRL has them; the full-distribution KL
(`objective/kl_full`) is Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t)) along each sampled response, the
Rao–Blackwellised estimate of the sequence KL beside the sample estimate `objective/kl` (Σ_t k1).

Shape legend: B rows (prompts × generations), T = data.context_length positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmobjective import config as config_lib
from lmobjective import faults, objectives, rewards as rewards_lib, sampling, sharding
from lmobjective.config import ConfigError
from lmobjective.data import prompts as prompts_lib
from lmobjective.data import sources
from lmobjective.objectives import policy, ppo
from lmobjective.run import experiment, scorer, stage


@dataclasses.dataclass
class RL:
  """Everything an RL run needs, built once from the config (`build`)."""
  config: config_lib.Config
  raw_config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  ms: experiment.ModelState  # model, optimizer, shardings, init from the origin, the reference
  objective: policy.PolicyGradient
  tokenizer: Any
  prompts: prompts_lib.PromptSet  # the prompts trained on
  eval_prompts: prompts_lib.PromptSet | None
  order: prompts_lib.PromptOrder
  rewards: rewards_lib.Rewards
  reward_model: scorer.RewardModelScorer | None  # rl.reward_model: scores the sampled ids on the device
  sampler: sampling.Sampler
  train_fn: Any  # (state, batch) -> (state, metrics): the guarded generic step
  score_fn: sharding.Program  # (params, reference params, batch) -> the old/reference log-probs and full KL
  data_fingerprints: dict

  @property
  def origin(self):
    return self.ms.origin

  @property
  def updates_per_iteration(self) -> int:
    return objectives.updates_per_step(self.config)


# ---- building ----------------------------------------------------------------------------------------


def _split(prompt_set: prompts_lib.PromptSet, val_fraction: float):
  """(train, held-out) of one prompt file: a fixed-seed permutation's last `val_fraction` share is held out."""
  n = len(prompt_set)
  perm = np.random.default_rng(0x50524F4D).permutation(n)
  k = int(round(val_fraction * n))
  return prompt_set.subset(np.sort(perm[:n - k])), (prompt_set.subset(np.sort(perm[n - k:])) if k else None)


def _check_prompts_fit(config, prompt_set, tokenizer, key: str) -> None:
  """Every prompt leaves room for rl.max_new_tokens in a row of data.context_length (one line, before writing)."""
  room = config.data.context_length - config.rl.max_new_tokens
  for i, p in enumerate(prompt_set.prompts):
    n = len(prompts_lib.render(p, tokenizer))
    if n > room:
      raise ConfigError(key, f"{prompt_set.path} record {i + 1}", f"the prompt renders to {n} tokens: more than "
                        f"data.context_length {config.data.context_length} - rl.max_new_tokens "
                        f"{config.rl.max_new_tokens} = {room}")


def build(raw_config: ml_collections.ConfigDict, workdir: str) -> RL:
  config = config_lib.typed(raw_config)
  rl = config.rl
  mesh = sharding.make_mesh(config.mesh)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  rows_per_update = config.train.batch_size * rl.num_generations // rl.num_minibatches
  if rows_per_update % (dp * config.train.grad_accum_steps):
    raise ConfigError("train.batch_size", config.train.batch_size,
                      f"x rl.num_generations / rl.num_minibatches = {rows_per_update} rows per update must be divisible "
                      f"by train.grad_accum_steps={config.train.grad_accum_steps} x the data*fsdp mesh size {dp}")
  reward_fns = rewards_lib.load(rl.reward_fn, rl.reward_weights,  # an unimportable reward: before anything is written
                                 {scorer.TERM: scorer.KEY} if rl.reward_model else None)
  origin_req = stage.request(config.train.init_from, workdir)
  tokenizer, save_tokenizer = stage.prepare_tokenizer(config.data, workdir, origin_req)
  rm = scorer.load(rl.reward_model, mesh, tokenizer, config.data.context_length) if rl.reward_model else None
  (name, scfg), = config.data.sources.items()
  key = sources.key(name, "path")
  train_prompts, heldout = _split(prompts_lib.load_prompts(name, scfg.path), scfg.val_fraction)
  eval_prompts = (prompts_lib.load_prompts(name, rl.eval_prompts, "rl.eval_prompts") if rl.eval_prompts
                  else heldout)
  _check_prompts_fit(config, train_prompts, tokenizer, key)
  if eval_prompts is not None:
    _check_prompts_fit(config, eval_prompts, tokenizer, "rl.eval_prompts" if rl.eval_prompts else key)
  ms = experiment.model_and_state(config, raw_config, mesh, tokenizer, origin_req,
                                  rows_per_update // config.train.grad_accum_steps)
  objective = objectives.from_config(config.objective, rl)
  token_bytes = jnp.asarray(tokenizer.token_byte_lengths(), jnp.int32)
  train_fn, _ = experiment._step_programs(config, objective, ms.model, ms.tx, mesh, ms.state_sharding,
                                          ms.params_sharding, token_bytes, reference_params=None)
  score_fn = sharding.Program(functools.partial(rollout_scores, ms.model, objective), mesh,
                              out_shardings=sharding.batch_sharding(mesh))
  fps = {name: {**sources.content_fingerprint(name, scfg), "prompts": train_prompts.fingerprint}}
  save_tokenizer()
  return RL(config=config, raw_config=raw_config, workdir=workdir, mesh=mesh, ms=ms, objective=objective,
            tokenizer=tokenizer, prompts=train_prompts, eval_prompts=eval_prompts,
            order=prompts_lib.PromptOrder(len(train_prompts), config.train.batch_size, config.seed),
            rewards=reward_fns, reward_model=rm, sampler=sampling.Sampler(ms.model, mesh), train_fn=train_fn, score_fn=score_fn,
            data_fingerprints=fps)


# ---- one iteration's responses -----------------------------------------------------------------------


def rollout_scores(model, objective: policy.PolicyGradient, params, reference_params, batch: dict) -> dict:
  """Per response token [B,T] (0 off the response): the policy's log-prob under the sampling
  distribution (`old_logps`), the reference's at rl.temperature (`ref_logps`), and the full
  distributions' KL(π‖π_ref) and entropy H(π) at that position. Without a reference (β = 0) the
  reference columns are 0."""
  mask = batch["loss_mask"] & (batch["targets"] >= 0)
  tgt = jnp.where(mask, batch["targets"], 0)[..., None]

  def dist(p, cfg):
    h = ppo.hidden_states(model, p, batch)
    return sampling.logps(model.apply({"params": p}, h, method="head"), cfg), h

  logp_BxTxV, h_BxTxD = dist(params, objective.sampling_config())
  out = {"old_logps": jnp.take_along_axis(logp_BxTxV, tgt, axis=-1)[..., 0],
         "entropy_full": policy.entropy(logp_BxTxV)}
  if objective.scored:  # PPO's value head: V(s_t) where the target is response token t, on the same pass
    out["values"] = ppo.values(model, params, batch, h_BxTxD=h_BxTxD)
  if reference_params is not None:
    ref_BxTxV, _ = dist(reference_params, objective.sampling_config(top_k=0, top_p=1.0))
    out["ref_logps"] = jnp.take_along_axis(ref_BxTxV, tgt, axis=-1)[..., 0]
    out["kl_full"] = policy.full_kl(logp_BxTxV, ref_BxTxV)
  else:
    out["ref_logps"] = out["kl_full"] = jnp.zeros(mask.shape, jnp.float32)
  return {k: jnp.where(mask, v, 0.0) for k, v in out.items()}


@dataclasses.dataclass
class Rollouts:
  """One iteration's responses as host arrays: the rows the updates read, and the iteration's metrics."""
  batch: dict[str, np.ndarray]  # [B,T] model fields, advantages [B], old/ref log-probs [B,T]
  metrics: dict[str, float]


def _pad_to(x_BxW: np.ndarray, T: int, fill) -> np.ndarray:
  return np.pad(x_BxW, ((0, 0), (0, T - x_BxW.shape[1])), constant_values=fill)


def sample_responses(rlx: RL, params, prompt_list, seed: int, iteration: int, cfg: sampling.SamplingConfig):
  """(Samples as NumPy, rows [B,T] for scoring, completions as text, prompt lengths [B]) of `prompt_list`
  (one row each)."""
  ids = [prompts_lib.render(p, rlx.tokenizer) for p in prompt_list]
  samples, prompt_BxP, lengths_B = rlx.sampler(params, ids, cfg, seed=seed, iteration=iteration)
  samples = sampling.Samples(*jax.device_get(samples))
  rows = jax.device_get(sampling.response_batch(jnp.asarray(prompt_BxP), jnp.asarray(lengths_B),
                                                jax.tree.map(jnp.asarray, samples), cfg.pad_id))
  T = rlx.config.data.context_length
  rows = {k: _pad_to(np.asarray(v), T, False if k == "loss_mask" else 0) for k, v in rows.items()}
  stops = set(cfg.stop_ids)
  completions = []
  for toks, n in zip(samples.tokens, samples.lengths):
    toks = list(toks[:n])
    if toks and toks[-1] in stops:
      toks = toks[:-1]
    completions.append(rlx.tokenizer.decode(toks))
  return samples, rows, completions, lengths_B


def score(rlx: RL, prompt_list, completions: list[str], fields: dict, rows: dict) -> rewards_lib.Scored:
  """The rewards of sampled responses: the functions on their text, the reward model (if any) on their ids."""
  precomputed = {scorer.TERM: rlx.reward_model(rows)} if rlx.reward_model is not None else None
  return rlx.rewards(prompt_list, completions, fields, precomputed)


def sampling_config(rlx: RL, prompt, **overrides) -> sampling.SamplingConfig:
  return rlx.objective.sampling_config(stop_ids=prompts_lib.stop_ids(prompt, rlx.tokenizer), pad_id=rlx.tokenizer.pad_id,
                                       **overrides)


def collect(rlx: RL, params, iteration: int) -> Rollouts:
  """Iteration `iteration`'s prompts, responses, rewards, log-probs and advantages (`Rollouts`)."""
  cfg, G = rlx.config, rlx.config.rl.num_generations
  idx = rlx.order.batch(iteration)
  prompt_list, fields = rlx.prompts.take(np.repeat(idx, G))
  samples, rows, completions, prompt_lengths_B = sample_responses(rlx, params, prompt_list, cfg.seed, iteration,
                                                sampling_config(rlx, prompt_list[0]))
  scored = score(rlx, prompt_list, completions, fields, rows)  # RewardError: one line naming the function
  scores_B = scored.rewards - cfg.rl.missing_eos_penalty * samples.truncated
  reference = rlx.ms.reference if rlx.objective.beta > 0 else None
  extra = jax.device_get(rlx.score_fn(params, reference, sharding.global_batch(rows, rlx.mesh)))
  kl_B = extra["old_logps"].sum(-1) - extra["ref_logps"].sum(-1)  # Σ_t k1 (0 without a reference)
  beta = rlx.objective.beta
  total_B = scores_B - beta * kl_B if cfg.rl.kl_placement == "reward" else scores_B
  metrics = _metrics(rlx, samples, scored, scores_B, kl_B, extra, prompt_lengths_B)
  if cfg.rl.mask_truncated_completions:
    rows["loss_mask"] = rows["loss_mask"] & ~samples.truncated[:, None]
  if isinstance(rlx.objective, ppo.PPO):
    per_token = _ppo_fields(cfg, beta, scores_B, extra, rows["loss_mask"])
    metrics["val/var_explained"] = float(ppo.explained_variance(jnp.asarray(per_token[policy.OLD_VALUES]),
                                                                jnp.asarray(per_token[policy.RETURNS]),
                                                                jnp.asarray(rows["loss_mask"])))
  else:
    adv_B = policy.advantages(total_B.reshape(-1, G), cfg.objective.kind, cfg.rl.scale_rewards).reshape(-1)
    per_token = {policy.ADVANTAGES: adv_B.astype(np.float32)}
  batch = {**rows, **per_token, policy.OLD_LOGPS: extra["old_logps"], policy.REF_LOGPS: extra["ref_logps"]}
  return Rollouts(batch, metrics)


def _ppo_fields(cfg, beta: float, scores_B: np.ndarray, extra: dict, mask_BxT: np.ndarray) -> dict[str, np.ndarray]:
  """PPO's per-token batch fields: −β·k1 per token plus the score on the last real token, GAE over the
  old values (whitened with rl.whiten_advantages), and the returns the value head is fitted to."""
  mask = jnp.asarray(mask_BxT)
  kl_BxT = jnp.asarray(extra["old_logps"] - extra["ref_logps"])  # k1 per token (0 without a reference)
  rewards = ppo.token_rewards(jnp.asarray(scores_B, jnp.float32), kl_BxT, mask, beta)
  old_values = jnp.where(mask, jnp.asarray(extra["values"]), 0.0)
  adv, returns = ppo.gae(rewards, old_values, mask, cfg.rl.gamma, cfg.rl.lam)
  if cfg.rl.whiten_advantages:
    adv = ppo.whiten(adv, mask)
  as_np = lambda x: np.asarray(jax.device_get(x), np.float32)
  return {policy.ADVANTAGES: as_np(adv), policy.OLD_VALUES: as_np(old_values), policy.RETURNS: as_np(returns)}


def _metrics(rlx, samples, scored, scores_B, kl_B, extra, prompt_lengths_B) -> dict[str, float]:
  """The iteration's metrics (docs/metrics.md), over responses or over sampled tokens, never padding."""
  G, beta = rlx.config.rl.num_generations, rlx.objective.beta
  sampled = samples.response_mask
  group_std = scored.rewards.reshape(-1, G).std(axis=-1)
  n = max(int(sampled.sum()), 1)
  # the sampler's log-probs against the trainer's forward, token by token (same tokens, same distribution)
  diff = np.abs(np.where(sampled, samples.logps - _response_aligned(extra["old_logps"], prompt_lengths_B, sampled), 0.0))
  m = {"reward": float(scored.rewards.mean()), "reward_std": float(group_std.mean()),
       "frac_reward_zero_std": float((group_std == 0).mean()),
       "objective/scores": float(scores_B.mean()), "objective/kl": float(kl_B.mean()),
       "objective/kl_full": float(extra["kl_full"].sum(-1).mean()),
       "objective/kl_full_per_token": float(extra["kl_full"].sum() / n),
       "objective/entropy": float(-samples.logps.sum(-1).mean()),
       "objective/entropy_full": float(extra["entropy_full"].sum(-1).mean()),
       "objective/non_score_reward": float(-beta * kl_B.mean()),
       "objective/rlhf_reward": float(scores_B.mean() - beta * kl_B.mean()),
       "completions/mean_length": float(samples.lengths.mean()),
       "completions/clipped_ratio": float(samples.truncated.mean()),
       "val/num_eos_tokens": int((~np.asarray(samples.truncated, bool)).sum()),
       "sampler_trainer/logp_diff_mean": float(diff.sum() / n), "sampler_trainer/logp_diff_max": float(diff.max())}
  m.update(rewards_lib.metrics(scored))
  return m


def _response_aligned(per_target_BxT: np.ndarray, prompt_lengths_B: np.ndarray, response_BxN: np.ndarray) -> np.ndarray:
  """[B,N] the value at response token t of each row, from the scoring rows (whose prompt starts at
  column 0, so response token t is the target of column prompt_length - 1 + t)."""
  N = response_BxN.shape[1]
  cols = np.minimum(prompt_lengths_B[:, None] - 1 + np.arange(N)[None], per_target_BxT.shape[1] - 1)
  return np.where(response_BxN, np.take_along_axis(per_target_BxT, cols, axis=1), 0.0)


# ---- updates -------------------------------------------------------------------------------------------


def minibatches(config, iteration: int) -> list[np.ndarray]:
  """The rows of each update of `iteration`, in order: each epoch a permutation of the prompts' groups
  (seeded by (seed, iteration, epoch); none with one epoch of one minibatch), cut into
  rl.num_minibatches parts of whole groups."""
  P, G, rl = config.train.batch_size, config.rl.num_generations, config.rl
  out = []
  for epoch in range(rl.epochs):
    groups = (np.arange(P) if rl.epochs * rl.num_minibatches == 1 else
              np.random.default_rng([config.seed, iteration, epoch]).permutation(P))
    for part in np.split(groups, rl.num_minibatches):
      out.append((part[:, None] * G + np.arange(G)[None]).reshape(-1))
  return out


def update(rlx: RL, state, rollouts: Rollouts, iteration: int, pending: list):
  """rl.epochs x rl.num_minibatches updates on the iteration's rows; each update's metrics go to `pending`."""
  for rows in minibatches(rlx.config, iteration):
    faults.point("update")
    host = {k: rollouts.batch[k][rows] for k in rlx.objective.fields}
    state, metrics = rlx.train_fn(state, sharding.global_batch(host, rlx.mesh))
    pending.append(metrics)
  return state


# ---- evaluation ----------------------------------------------------------------------------------------

EVAL_STREAM = 1 << 30  # eval samples are drawn from iterations EVAL_STREAM + step: never a training iteration's keys


@dataclasses.dataclass
class EvalScores:
  """Rewards of responses to held-out prompts, [prompts, k] each: the weighted total and every term."""
  rewards: np.ndarray
  per_term: dict[str, np.ndarray]  # name -> [prompts, k] (NaN where the term did not apply)
  kl_full: np.ndarray | None = None  # [prompts, k] Σ_t KL(π‖π_ref) over each response's positions


def eval_scores(rlx: RL, params, prompt_set: prompts_lib.PromptSet, greedy: bool, samples_per_prompt: int = 1,
                stream: int = EVAL_STREAM, with_kl: bool = False) -> EvalScores:
  """`EvalScores` of responses to every prompt of `prompt_set`: greedy (temperature 0, one each) or sampled
  at rl.temperature; `with_kl` adds the full-distribution KL to the reference of each response."""
  k = 1 if greedy else samples_per_prompt
  idx = np.repeat(np.arange(len(prompt_set)), k)
  shards = rlx.mesh.shape["data"] * rlx.mesh.shape["fsdp"]
  padded = np.concatenate([idx, np.full(-len(idx) % shards, idx[-1])])  # the batch splits over the mesh
  prompt_list, fields = prompt_set.take(padded)
  cfg = sampling_config(rlx, prompt_list[0], **({"temperature": 0.0} if greedy else {}))
  _, rows, completions, _ = sample_responses(rlx, params, prompt_list, rlx.config.seed, stream, cfg)
  scored = score(rlx, prompt_list, completions, fields, rows)
  shape = lambda x: np.asarray(x)[:len(idx)].reshape(-1, k)
  kl = None
  if with_kl and rlx.objective.beta > 0:
    extra = jax.device_get(rlx.score_fn(params, rlx.ms.reference, sharding.global_batch(rows, rlx.mesh)))
    kl = shape(extra["kl_full"].sum(-1))
  return EvalScores(shape(scored.rewards), {n: shape(v) for n, v in zip(scored.names, scored.per_function)}, kl)


def eval_rewards(rlx: RL, params, prompt_set: prompts_lib.PromptSet, greedy: bool, samples_per_prompt: int = 1,
                 stream: int = EVAL_STREAM) -> np.ndarray:
  """[prompts, samples_per_prompt] rewards (the weighted total) of `eval_scores`."""
  return eval_scores(rlx, params, prompt_set, greedy, samples_per_prompt, stream).rewards


def stderr(x_PxK) -> float:
  """The standard error of the mean of [prompts, samples] scores, prompts the independent units: the
  sample standard deviation of the per-prompt means (over their finite entries) over √prompts (NaN
  with fewer than two)."""
  means = np.array([np.nanmean(row) for row in np.asarray(x_PxK, np.float64) if np.isfinite(row).any()])
  return float(means.std(ddof=1) / np.sqrt(len(means))) if len(means) > 1 else float("nan")


def evaluate(rlx: RL, params, step: int = 0) -> dict[str, float]:
  """On the held-out prompts, when there are some: val_reward_greedy and val_reward_sampled (mean total
  rewards; with a 0/1 reward, pass@1) and the latter's `stderr` (..._stderr); with more than one reward
  term, each term's mean as val_rewards/<term>/greedy and /sampled (+ /sampled_stderr), or
  val_watched/<term>/... for a term of weight 0 (watched,
  not optimised: a gold reward beside a proxy; `analysis/diagnose.py` reads it for reward hacking);
  and with a reference, val_kl_full_sampled: the mean full-distribution KL(π‖π_ref) summed over each
  sampled response, the KL over-optimisation curves are drawn against."""
  if rlx.eval_prompts is None:
    return {}
  greedy = eval_scores(rlx, params, rlx.eval_prompts, greedy=True, stream=EVAL_STREAM + step)
  sampled = eval_scores(rlx, params, rlx.eval_prompts, greedy=False, samples_per_prompt=rlx.config.rl.eval_samples,
                        stream=EVAL_STREAM + step, with_kl=True)
  out = {"val_reward_greedy": float(greedy.rewards.mean()), "val_reward_sampled": float(sampled.rewards.mean()),
         "val_reward_sampled_stderr": stderr(sampled.rewards)}
  if len(sampled.per_term) > 1:
    watched = {n for n, w in zip(rlx.rewards.names, rlx.rewards.weights_F) if w == 0}
    for which, s in (("greedy", greedy), ("sampled", sampled)):
      for n, v in s.per_term.items():
        if np.isfinite(v).any():
          key = f"{'val_watched' if n in watched else 'val_rewards'}/{n}/{which}"
          out[key] = float(np.nanmean(v))
          if which == "sampled":
            out[key + "_stderr"] = stderr(v)
  if sampled.kl_full is not None:
    out["val_kl_full_sampled"] = float(sampled.kl_full.mean())
  return out
