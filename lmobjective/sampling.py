"""Sampling from a trained Transformer, with a KV cache or without one (the reference).

Cached: the prompt is run once through `Transformer.decode` (prefill), then one token per step,
each step attending to the cached keys/values of all earlier tokens. Uncached: the whole buffer
goes through the ordinary training forward every step and the logits at the last filled position
are used (causal attention makes the empty tail irrelevant). Both use the same sampler and the
same per-step keys, so greedy decoding gives the same tokens and sampling the same draws up to
float rounding of the logits. Neither builds [B, M, V] logits: the head runs only at the position
sampled from (the prefill's last token; the reference's last filled position), which keeps
large vocabularies cheap. Both are pure functions; callers jit them (`inspection.Run` through a
`sharding.Program`, with `model` and the sampling settings static).

Shape legend: B batch, P prompt tokens, N new tokens, M = P + N, V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lmobjective.model import Transformer, init_cache


def sample(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
           vocab_limit: int | None = None) -> jax.Array:
  """temperature 0 = greedy (argmax); top_k keeps the k most likely tokens before sampling.

  `vocab_limit`: only ids below it can be drawn (the tokenizer's vocabulary, when the model's is
  padded beyond it: those rows are never targets and cannot be decoded).
  """
  if vocab_limit is not None:
    logits_BxV = logits_BxV[:, :vocab_limit]
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def generate_cached(model: Transformer, params, prompt_BxP: jax.Array, key: jax.Array, *,
                    max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                    vocab_limit: int | None = None) -> jax.Array:
  """New token ids [B, N] after `prompt_BxP`, decoding with a KV cache of M = P + N slots."""
  B, P = prompt_BxP.shape
  N = max_new_tokens
  decode = functools.partial(model.apply, {"params": params}, method=Transformer.decode)
  cache = init_cache(model.cfg, B, P + N)
  logits_Bx1xV, cache = decode(prompt_BxP, jnp.broadcast_to(jnp.arange(P), (B, P)), cache, last_only=True)
  first_B = sample(logits_Bx1xV[:, 0], jax.random.fold_in(key, 0), temperature, top_k, vocab_limit)

  def step(carry, t):
    tok_B, cache = carry
    logits_Bx1xV, cache = decode(tok_B[:, None], jnp.full((B, 1), P + t, jnp.int32), cache)
    nxt_B = sample(logits_Bx1xV[:, 0], jax.random.fold_in(key, t + 1), temperature, top_k, vocab_limit)
    return (nxt_B, cache), tok_B

  (last_B, _), toks_NxB = jax.lax.scan(step, (first_B, cache), jnp.arange(N - 1))
  return jnp.concatenate([toks_NxB.T, last_B[:, None]], axis=1)


def generate_uncached(model: Transformer, params, prompt_BxP: jax.Array, key: jax.Array, *,
                      max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                      vocab_limit: int | None = None) -> jax.Array:
  """The reference: a full training forward over the [B, M] buffer for every new token."""
  B, P = prompt_BxP.shape
  N = max_new_tokens
  buf_BxM = jnp.zeros((B, P + N), jnp.int32).at[:, :P].set(prompt_BxP)

  def step(buf_BxM, t):
    h_BxMxD = model.apply({"params": params}, buf_BxM, method="hidden_states")
    h_Bx1xD = jax.lax.dynamic_slice_in_dim(h_BxMxD, P + t - 1, 1, axis=1)
    last_BxV = model.apply({"params": params}, h_Bx1xD, method="head")[:, 0]
    tok_B = sample(last_BxV, jax.random.fold_in(key, t), temperature, top_k, vocab_limit)
    return jax.lax.dynamic_update_slice_in_dim(buf_BxM, tok_B[:, None], P + t, axis=1), None

  buf_BxM, _ = jax.lax.scan(step, buf_BxM, jnp.arange(N))
  return buf_BxM[:, P:]
