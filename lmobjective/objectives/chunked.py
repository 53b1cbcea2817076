"""Memory-efficient scoring: the LM head fused with the loss, computed in chunks of positions.

The dense path materialises logits [B,T,V] in float32, plus the softmax and its gradient of the
same size: with V=262,144 and 16k tokens per step that is 17 GB per buffer. `map_chunks` splits
the positions into chunks of C; each chunk computes its logits [B,C,V] through the model's own
head (tied or untied, same dtype handling, same sharding constraints), reduces them to
per-token statistics, and drops them. The chunk body is wrapped in `jax.checkpoint`, so the
backward pass recomputes one chunk's logits at a time instead of storing them: the gradient is
the exact autodiff gradient (no approximation), at the cost of one extra head matmul.

Chunks run along T (not over flattened tokens) so every chunk keeps the batch axis and its
data/fsdp sharding: each device works on its own rows at every scan step. Nothing here knows the
loss: `objective.score` passes the per-chunk statistics function.

Shape legend: B batch, T positions, C positions per chunk, n chunks, D embed, V vocabulary.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _pad_positions(x, pad: int):
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths)  # zeros / False: a padded position is never valid


def map_chunks(fn: Callable, h_BxTxD: jax.Array, per_position: tuple[jax.Array, ...], chunk_size: int):
  """`fn(h_BxCxD, *xs_BxC)` over chunks of C positions, its [B,C] outputs joined back to [B,T].

  Args:
    fn: one chunk's hidden states and per-position inputs -> a pytree of [B,C] arrays. It must
      give zeros where its inputs mark a position invalid: the padded tail (when C does not
      divide T) gets zero/False inputs and is cut off again.
    h_BxTxD: final hidden states.
    per_position: [B,T] arrays (targets, validity masks, ...).
    chunk_size: C (at most T is used).
  """
  B, T, _ = h_BxTxD.shape
  C = min(chunk_size, T)
  n = -(-T // C)
  pad = n * C - T
  xs = (h_BxTxD,) + tuple(per_position)
  if pad:
    xs = tuple(_pad_positions(x, pad) for x in xs)
  to_chunks = lambda x: x.reshape((B, n, C) + x.shape[2:]).swapaxes(0, 1)  # [n,B,C,...]
  body = lambda _, chunk: (None, fn(*chunk))
  # prevent_cse=False: the scan already keeps the recomputation from being merged away.
  _, out = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), None, tuple(to_chunks(x) for x in xs))
  from_chunks = lambda y: y.swapaxes(0, 1).reshape((B, n * C) + y.shape[3:])[:, :T]
  return jax.tree.map(from_chunks, out)
