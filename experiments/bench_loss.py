"""Memory and time of the LM-head + cross-entropy forward and backward: dense vs chunked.

    python experiments/bench_loss.py                      # V=262,144, 16k tokens (memory only), CPU timing
    python experiments/bench_loss.py --vocab=50304 --tokens=8192 --time_vocab=0

Memory is the compiler's own plan for the jitted loss-and-gradient function
(`jax.jit(f).lower(...).compile().memory_analysis()`): `temp` is the scratch the step needs on
top of its inputs and outputs (logits, softmax, their gradients), which is what chunking
removes. It is deterministic and needs no device memory, so the 16 GiB dense case can be
planned on a laptop. Timing runs a smaller problem for real (CPU here, or whatever device JAX
finds) and reports the median of several calls.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lmobjective.objectives import next_token

_VOCAB = flags.DEFINE_integer("vocab", 262_144, "Vocabulary for the memory table.")
_TOKENS = flags.DEFINE_integer("tokens", 16_384, "Tokens per step for the memory table (batch x context).")
_BATCH = flags.DEFINE_integer("batch", 16, "Rows; context = tokens / batch.")
_DIM = flags.DEFINE_integer("dim", 768, "Hidden size D.")
_CHUNKS = flags.DEFINE_list("chunks", ["256", "64", "16"], "Chunk sizes (positions per row) to compare.")
_TIME_VOCAB = flags.DEFINE_integer("time_vocab", 32_768, "Vocabulary for the timing table (0 = skip).")
_TIME_TOKENS = flags.DEFINE_integer("time_tokens", 2_048, "Tokens for the timing table.")
_TIME_DIM = flags.DEFINE_integer("time_dim", 256, "D for the timing table.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (median).")


def loss_and_grad(chunk: int):
  def f(h, w, t):
    return next_token.loss_sums(next_token.head_token_losses(lambda x: x @ w, h, t, None, chunk)).loss_sum
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def specs(batch, tokens, dim, vocab, dtype=jnp.float32):
  T = tokens // batch
  return (jax.ShapeDtypeStruct((batch, T, dim), dtype), jax.ShapeDtypeStruct((dim, vocab), dtype),
          jax.ShapeDtypeStruct((batch, T), jnp.int32))


def memory_table(batch, tokens, dim, vocab, chunks) -> None:
  T = tokens // batch
  print(f"loss + gradient (w.r.t. hidden states and head), V={vocab:,}, {batch} x {T} = {tokens:,} tokens, "
        f"D={dim}, float32; one [tokens, V] float32 buffer = {tokens * vocab * 4 / 2**30:.2f} GiB")
  print(f"{'method':<22} {'temp GiB':>9} {'args+out GiB':>12} {'temp / dense':>12} {'compile s':>9}")
  dense_temp = None
  for chunk in [0] + chunks:
    t0 = time.perf_counter()
    m = loss_and_grad(chunk).lower(*specs(batch, tokens, dim, vocab)).compile().memory_analysis()
    compile_s = time.perf_counter() - t0
    dense_temp = dense_temp or m.temp_size_in_bytes
    name = "dense" if not chunk else f"chunked C={chunk} ({batch * chunk:,} tok)"
    print(f"{name:<26} {m.temp_size_in_bytes / 2**30:>9.3f} "
          f"{(m.argument_size_in_bytes + m.output_size_in_bytes) / 2**30:>12.3f} "
          f"{m.temp_size_in_bytes / dense_temp:>12.4f} {compile_s:>9.1f}")


def time_table(batch, tokens, dim, vocab, chunks, repeats) -> None:
  T = tokens // batch
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((batch, T, dim)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((dim, vocab)) * 0.02, jnp.float32)
  t = jnp.asarray(rng.integers(0, vocab, (batch, T)), jnp.int32)
  print(f"\ntime on {jax.devices()[0].device_kind} ({jax.device_count()} device), V={vocab:,}, "
        f"{batch} x {T} = {tokens:,} tokens, D={dim}, float32, median of {repeats}")
  print(f"{'method':<22} {'ms':>9} {'vs dense':>9} {'loss':>12}")
  dense_ms = None
  fns = {c: loss_and_grad(c) for c in [0] + chunks}
  for c, fn in fns.items():
    jax.block_until_ready(fn(h, w, t))
  times = {c: [] for c in fns}
  for _ in range(repeats):  # alternate, so background load hits every method alike
    for c, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(h, w, t))
      times[c].append(time.perf_counter() - t0)
  for c, fn in fns.items():
    ms = 1e3 * statistics.median(times[c])
    dense_ms = dense_ms or ms
    loss = float(fn(h, w, t)[0])
    name = "dense" if not c else f"chunked C={c} ({batch * c:,} tok)"
    print(f"{name:<26} {ms:>9.1f} {ms / dense_ms:>9.2f} {loss:>12.4f}")


def main(argv) -> None:
  del argv
  chunks = [int(c) for c in _CHUNKS.value]
  memory_table(_BATCH.value, _TOKENS.value, _DIM.value, _VOCAB.value, chunks)
  if _TIME_VOCAB.value:
    time_chunks = [c for c in chunks if c <= _TIME_TOKENS.value // _BATCH.value]
    time_table(_BATCH.value, _TIME_TOKENS.value, _TIME_DIM.value, _TIME_VOCAB.value, time_chunks,
               _REPEATS.value)


if __name__ == "__main__":
  app.run(main)
