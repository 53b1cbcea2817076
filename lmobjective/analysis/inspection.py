"""Look inside a trained run from a notebook: `run = lmobjective.restore(workdir)`.

Needs only the run directory (checkpoints/, tokenizer/, metrics.jsonl), restores the parameters
onto this process's first device (any device count, CPU included) and knows nothing of the
optimizer. Every method scores text the way training did: a text is one document, so its first
token is predicted from EOS (the document separator), and every later token from the ones before
it; text longer than the context is scored in lm-evaluation-harness's rolling windows
(`analysis/loglikelihood.py`: each token once, a window's first token from the token before it).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmobjective import config as config_lib
from lmobjective import objectives, sampling, sharding, step, validation
from lmobjective.analysis import loglikelihood, pairs
from lmobjective.objectives import next_token, preference, reward_model
from lmobjective.data import prompts, sft, tokenizers
from lmobjective.model import ModelConfig, Transformer
from lmobjective.run import checkpoint as ckpt_lib
from lmobjective.run import metrics_log


@dataclasses.dataclass
class PositionLosses:
  """Per target token: the token, p(target) and -log p(target) (nats); `mean` over all of them."""
  tokens: list[str]  # decoded target tokens
  target_ids: np.ndarray  # [n] int
  p_target: np.ndarray  # [n] float
  nll: np.ndarray  # [n] float, nats
  num_bytes: int  # UTF-8 bytes of the text

  @property
  def mean(self) -> float:
    return float(self.nll.mean()) if self.nll.size else float("nan")

  def rows(self) -> list[dict[str, Any]]:
    return [{"position": i, "token": t, "p_target": float(p), "nll": float(n)}
            for i, (t, p, n) in enumerate(zip(self.tokens, self.p_target, self.nll))]

  def __repr__(self) -> str:
    lines = [f"{'pos':>4}  {'token':<16} {'p(target)':>9} {'-log p':>7}"]
    lines += [f"{r['position']:>4}  {r['token']!r:<16} {r['p_target']:>9.4f} {r['nll']:>7.3f}" for r in self.rows()]
    lines.append(f"mean -log p = {self.mean:.4f} nats over {len(self.tokens)} targets")
    return "\n".join(lines)


@dataclasses.dataclass
class Run:
  workdir: str
  config: config_lib.Config  # the checkpoint's config, typed
  params: Any
  tokenizer: tokenizers.Tokenizer
  model: Transformer
  step: int
  metrics: list[dict]  # metrics.jsonl, parsed

  @property
  def context_length(self) -> int:
    return int(self.config.data.context_length)

  # ---- scoring ------------------------------------------------------------------------------

  @functools.cached_property
  def objective(self) -> objectives.Objective:
    """The objective the run trained (its `config.objective`)."""
    return objectives.from_config(self.config.objective, self.config.rl)

  @functools.cached_property
  def mesh(self):
    """The mesh the params live on (one device after `restore`; the training mesh for live,
    sharded params): every program here is compiled with its rules bound."""
    placed = jax.tree.leaves(self.params)[0].sharding
    if isinstance(placed, jax.sharding.NamedSharding):
      return placed.mesh
    return sharding.single_device_mesh(next(iter(placed.device_set)))

  @functools.cached_property
  def row_losses(self):
    """(params, batch of `inputs`, `targets`, `positions`, `segment_ids`, `loss_mask` [B,T]) -> `TokenLosses`:
    the one program every text score here runs (`analysis.loglikelihood.score`), chunked as the run was."""
    chunk = int(self.config.objective.loss_chunk_size)
    return sharding.Program(lambda params, batch: next_token.score(self.model, params, batch, chunk_size=chunk),
                            self.mesh)

  @functools.cached_property
  def eval_program(self):
    """`step.eval_step` of next-token prediction as a Program on this run's mesh, chunked as the run was
    (`evaluate --source` of a token source, whatever objective the run trained)."""
    token_bytes = jnp.asarray(self.tokenizer.token_byte_lengths(), jnp.int32)
    scorer = next_token.NextToken(loss_chunk_size=int(self.config.objective.loss_chunk_size))
    return sharding.Program(lambda params, batch: step.eval_step(
        params, batch, model=self.model, objective=scorer, token_bytes_V=token_bytes), self.mesh)

  @functools.cached_property
  def pair_program(self):
    """(params, pair batch) -> `PairLogps`, through the one function for sequence log-probs
    (`next_token.sequence_logps`), chunked as the run was."""
    chunk = int(self.config.objective.loss_chunk_size)
    return sharding.Program(lambda params, batch: preference.pairs_of(
        next_token.sequence_logps(self.model, params, batch, chunk_size=chunk)), self.mesh)

  @functools.cached_property
  def _reward_program(self):
    return sharding.Program(lambda params, batch: reward_model.row_rewards(self.model, params, batch), self.mesh)

  def reward(self, prompts: list[str | list[dict]], completions: list[str], batch_size: int = 32) -> np.ndarray:
    """A reward model's score of each (prompt, completion), float64 [N]: each rendered as one response
    of a preference pair (`data.sft.render_pairs`: a plain prompt + completion + EOS, or a chat prompt
    + an assistant turn), scored at the last position the training read (`reward_model.row_rewards`)."""
    if not self.objective.scored:
      raise ValueError(f"{self.workdir} is not a reward model (objective.kind={self.config.objective.kind!r})")
    if len(prompts) != len(completions):
      raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    T = self.context_length
    ids, lengths, flags = sft.render_pairs([{"prompt": p, "chosen": c, "rejected": c}
                                            for p, c in zip(prompts, completions)], self.tokenizer)
    docs = list(zip(np.split(ids, np.cumsum(lengths)[:-1]), np.split(flags, np.cumsum(lengths)[:-1])))[::2]
    out = []
    for first in range(0, len(docs), batch_size):
      fields = {k: np.zeros((batch_size, T), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
      fields["loss_mask"] = np.zeros((batch_size, T), bool)
      for i, (doc, flag) in enumerate(docs[first:first + batch_size]):
        if len(doc) - 1 > T:
          raise ValueError(f"prompt {first + i} with its completion is {len(doc) - 1} tokens: more than this "
                           f"run's data.context_length={T}")
        n = len(doc) - 1
        fields["inputs"][i, :n], fields["targets"][i, :n], fields["loss_mask"][i, :n] = doc[:-1], doc[1:], flag[1:]
        fields["segment_ids"][i, :n], fields["positions"][i, :n] = 1, np.arange(n)
      r_B, _ = jax.device_get(self._reward_program(self.params, fields))
      out.append(np.asarray(r_B, np.float64)[:len(docs[first:first + batch_size])])
    return np.concatenate(out) if out else np.zeros(0)

  def preference_accuracy(self, path: str, **kw) -> dict[str, float]:
    """`analysis.pairs.evaluate_pairs` of this run on a preference_jsonl file."""
    return pairs.evaluate_pairs(self, path, **kw)

  @functools.cached_property
  def _samplers(self) -> dict[bool, sampling.Sampler]:
    """The core sampler on this run's mesh: KV-cached (True) and the uncached reference (False)."""
    return {cached: sampling.Sampler(self.model, self.mesh, cached=cached) for cached in (True, False)}

  def loss_per_position(self, text: str) -> PositionLosses:
    """One sentence is many training samples: the loss of predicting each of its tokens from the ones
    before (`loglikelihood.score_text`: the first from the opener, a text longer than the context in
    lm-evaluation-harness's rolling windows)."""
    scored = loglikelihood.score_text(self, self.tokenizer.encode(text))
    nll = -scored.token_logprobs
    return PositionLosses(tokens=[self.tokenizer.decode([int(t)]) for t in scored.token_ids],
                          target_ids=scored.token_ids, p_target=np.exp(-nll), nll=nll,
                          num_bytes=len(text.encode("utf-8")))

  def perplexity(self, texts: str | list[str]) -> dict[str, float]:
    """Token-weighted loss over `texts` (each its own document): loss, perplexity, bits per token and byte."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    parts = [self.loss_per_position(t) for t in texts]
    loss_sum = float(sum(p.nll.astype(np.float64).sum() for p in parts))
    n, nbytes = sum(len(p.nll) for p in parts), sum(p.num_bytes for p in parts)
    out = next_token.summarize(loss_sum, n, nbytes)
    out["num_bytes"] = nbytes
    return out

  def next_token_distribution(self, prefix: str | list[dict], top_k: int = 10, temperature: float = 1.0,
                              top_p: float = 1.0) -> list[tuple[str, int, float]]:
    """The top-k (token, id, probability) of the first token `generate(prefix, ...)` would draw, most
    likely first: the sampler's own distribution (`sampling.logps`; temperature 1 and top_p 1 give
    the model's). The prefix is rendered as `prompt_ids` renders it."""
    cfg = sampling.SamplingConfig(max_new_tokens=1, temperature=temperature, top_p=top_p)
    logp = np.asarray(self._samplers[True].next_logps(self.params, [self.prompt_ids(prefix)], cfg))[0]
    top = np.argsort(-logp, kind="stable")[:top_k]
    return [(self.tokenizer.decode([int(i)]), int(i), float(np.exp(logp[i]))) for i in top]

  # ---- sampling -----------------------------------------------------------------------------

  def prompt_ids(self, prompt: str | list[dict]) -> list[int]:
    """What the model is conditioned on, rendered as a preference pair's prompt is: EOS + the text
    (a document, as in pretraining), or chat messages ([{'role', 'content'}, ...]) rendered with the
    SFT template up to the assistant header."""
    return prompts.render(prompt if isinstance(prompt, str) else list(prompt), self.tokenizer)

  def stop_ids(self, prompt: str | list[dict]) -> tuple[int, ...]:
    """Where a response ends: EOS after a plain prompt; the turn's <|end|> (or EOS) after a chat prompt."""
    return prompts.stop_ids(prompt, self.tokenizer)

  def sample(self, prompts: list[str | list[dict]], max_new_tokens: int = 50, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, use_cache: bool = True) -> sampling.Samples:
    """`sampling.Samples` (NumPy) of a batch of prompts of any lengths, plain or chat, each row
    stopping at its own terminator (`stop_ids`; a batch mixes kinds only if they share it)."""
    stops = {self.stop_ids(p) for p in prompts}
    if len(stops) > 1:
      raise ValueError("prompts: plain and chat prompts end at different tokens; sample them in separate batches")
    return self.sample_ids([self.prompt_ids(p) for p in prompts], stops.pop(), max_new_tokens, temperature, top_k,
                           top_p, seed, use_cache)

  def sample_ids(self, prompt_ids: list[list[int]], stop_ids: tuple[int, ...], max_new_tokens: int = 50,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 use_cache: bool = True) -> sampling.Samples:
    """`sampling.Samples` (NumPy) of prompts given as token ids, each row stopping at any of `stop_ids`."""
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                                  top_p=float(top_p), stop_ids=tuple(stop_ids), pad_id=self.tokenizer.pad_id)
    out, _, _ = self._samplers[bool(use_cache)](self.params, prompt_ids, cfg, seed=seed)
    return sampling.Samples(*jax.device_get(out))

  def generate_ids(self, prompt: str | list[dict], max_new_tokens: int = 50, temperature: float = 1.0,
                   top_k: int = 0, seed: int = 0, use_cache: bool = True, top_p: float = 1.0) -> list[int]:
    """The sampled response's ids, through its terminator when it reached one (`sample` of one prompt)."""
    s = self.sample([prompt], max_new_tokens, temperature, top_k or 0, top_p, seed, use_cache)
    return [int(t) for t in s.tokens[0][s.response_mask[0]]]

  def generate(self, prompt: str | list[dict], max_new_tokens: int = 50, temperature: float = 1.0,
               top_k: int = 0, seed: int = 0, top_p: float = 1.0) -> str:
    """Continuation of `prompt` as text, without its terminator (KV-cached; temperature 0 = greedy).
    A chat prompt (a list of messages) is rendered with the SFT template and the reply ends at the
    turn's <|end|>."""
    new = self.generate_ids(prompt, max_new_tokens, temperature, top_k, seed, top_p=top_p)
    if new and new[-1] in self.stop_ids(prompt):
      new = new[:-1]
    return self.tokenizer.decode(new)

  # ---- plots --------------------------------------------------------------------------------

  def plot_loss_curves(self):
    """The run's curves as its objective draws them (`plotting.curves`: TRL's rewards for pairs)."""
    from lmobjective.analysis import plotting
    return plotting.curves(self.objective, self.metrics, title=os.path.basename(os.path.abspath(self.workdir)))

  def plot_loss_per_position(self, text: str | PositionLosses, max_tokens: int = 60):
    """Bars of -log p(target) per token, with p(target) on the right axis."""
    import matplotlib.pyplot as plt
    pl = self.loss_per_position(text) if isinstance(text, str) else text
    n = min(len(pl.tokens), max_tokens)
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * n + 2), 4))
    x = np.arange(n)
    ax.bar(x, pl.nll[:n], color="C0", label="-log p(target)")
    ax.set_xticks(x, [repr(t)[1:-1] for t in pl.tokens[:n]], rotation=90, fontsize=7)
    ax.set(ylabel="-log p(target) (nats)", title=f"loss per position (mean {pl.mean:.3f} nats), step {self.step}")
    ax2 = ax.twinx()
    ax2.plot(x, pl.p_target[:n], "o", color="C3", ms=3, label="p(target)")
    ax2.set(ylabel="p(target)", ylim=(0, 1))
    fig.tight_layout()
    return fig

  def plot_next_token(self, prefix: str, top_k: int = 10):
    import matplotlib.pyplot as plt
    dist = self.next_token_distribution(prefix, top_k)
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(dist) + 1.2))
    ax.barh([repr(t)[1:-1] or "<empty>" for t, _, _ in dist][::-1], [p for _, _, p in dist][::-1], color="C2")
    ax.set(xlabel="probability", title=f"next token after {prefix[-30:]!r}")
    fig.tight_layout()
    return fig


def _abstract_params(model: Transformer, T: int, device) -> Any:
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]
  shapes = nn.meta.unbox(shapes)
  sharding = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def restore(workdir: str, step: int | None = None, device=None) -> Run:
  """The run in `workdir` at checkpoint `step` (default: the newest readable one), on `device` (default: first)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  mngr = ckpt_lib.make_manager(workdir, read_only=True)
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {os.path.join(workdir, ckpt_lib.CKPT_DIR)}")
  found = ckpt_lib.latest_config(mngr) if step is None else (step, mngr.restore(
      step, args=ckpt_lib.ocp.args.Composite(config=ckpt_lib.ocp.args.JsonRestore()))["config"])
  if found is None:
    raise FileNotFoundError(f"no readable checkpoint in {os.path.join(workdir, ckpt_lib.CKPT_DIR)}")
  config = ml_collections.ConfigDict(ckpt_lib.with_added_keys(found[1]))
  tok, _ = tokenizers.load(os.path.join(workdir, "tokenizer"), key="workdir")
  model = objectives.model_class(config.objective.kind)(
      ModelConfig.from_config(config.model, tok.vocab_size, config.data.context_length))
  abstract = _abstract_params(model, int(config.data.context_length), device or jax.devices()[0])
  got_step, params, meta, _ = ckpt_lib.restore_params(workdir, step if step is not None else None, abstract)
  if meta["tokenizer"]["fingerprint"] != tok.fingerprint():
    raise ValueError(f"{workdir}/tokenizer is not the tokenizer checkpoint {got_step} was trained with")
  if got_step != found[0]:  # the newest was damaged: use the config of the one restored
    config = ml_collections.ConfigDict(ckpt_lib.with_added_keys(mngr.restore(
        got_step, args=ckpt_lib.ocp.args.Composite(config=ckpt_lib.ocp.args.JsonRestore()))["config"]))
  mngr.close()
  validation.validate(config)  # the checkpoint's config, as a run would have been checked
  path = os.path.join(workdir, metrics_log.METRICS_FILE)
  metrics = metrics_log.read_metrics(path) if os.path.exists(path) else []
  return Run(workdir=workdir, config=config_lib.typed(config), params=params, tokenizer=tok, model=model, step=got_step,
             metrics=metrics)


def restore_hf(path: str, context_length: int | None = None, device=None) -> Run:
  """A Hugging Face model directory (config.json, model.safetensors[.index.json], tokenizer.json) as a `Run`
  on `device` (default: the first): `loss_per_position`, `perplexity`, `next_token_distribution`,
  `generate`, ... with the model's own tokenizer. A text opens with BOS where the model's tokenizer adds
  it (Llama), else with EOS (GPT-2's <|endoftext|>). `context_length`: default the model's
  max_position_embeddings, at most 2048."""
  from lmobjective.data import tokenizers as tokenizers_lib
  from lmobjective.hf import configs, load as hf_load
  path = os.path.abspath(os.path.expanduser(path))
  hf = configs.read(path)
  tok = tokenizers_lib.load_hf(path, hf)
  longest = hf.get("max_position_embeddings") or hf.get("n_positions") or 2048
  T = int(context_length or min(longest, 2048))
  mesh = sharding.single_device_mesh(device)
  model, params, _ = hf_load.import_model(path, mesh=mesh, context_length=T, tokenizer_vocab=tok.vocab_size)
  config = config_lib.load_config_file(config_lib.DEFAULT_CONFIG)
  for key, value in configs.model_keys(hf, os.path.join(path, "config.json"), T).items():
    config.model[key] = value
  config.data.context_length = T
  validation.validate(config)
  return Run(workdir=path, config=config_lib.typed(config), params=params, tokenizer=tok, model=model, step=0,
             metrics=[])
