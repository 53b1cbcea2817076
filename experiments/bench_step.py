"""Training-step benchmark for one config: tokens/s, MFU, peak device memory, compile time.

    python experiments/bench_step.py --config=configs/gpt2_124m.py --steps=20
    python experiments/bench_step.py --config=configs/tiny.py --config.objective.loss_chunk_size=16

The step is the framework's own `step.train_step`, jitted with the same shardings and donation
as `experiment.build` (data is a fixed random batch already on device, so the figure is the model
and optimizer, not the input pipeline; bench_data.py measures that). MFU uses nanoGPT's
formula, `model.flops_per_token` = 6N + 12*L*D*T per token, over the device's dense peak for
the config's compute dtype (`hardware.PEAK_FLOPS`; CPUs have no entry and report no MFU).
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from lmobjective import objectives, sharding, step
from lmobjective.model import ModelConfig, Transformer, count_params, flops_per_token
from lmobjective.optimizer import make_optimizer
from lmobjective.run import hardware, launch


class StepBench:
  """A jitted train step plus a resident random batch, built from a config."""

  def __init__(self, config, vocab_size: int | None = None, devices=None, seed: int = 0):
    self.config = config
    vocab = config.model.vocab_size or vocab_size
    self.model_cfg = ModelConfig.from_config(config.model, vocab, config.data.context_length)
    model = Transformer(self.model_cfg)
    tx = make_optimizer(config.optimizer, config.train.steps, sharding.logical_axes(model))
    self.mesh = mesh = sharding.make_mesh(config.mesh, devices)
    B, T, k = config.train.batch_size, config.data.context_length, config.train.grad_accum_steps
    self.tokens_per_step = B * T
    with sharding.activate(mesh):  # mirrors experiment.build
      params_sharding = sharding.param_shardings(model, mesh, (B // k, T))
      init = functools.partial(step.init_state, model, tx, batch_shape=(B // k, T))
      state_sharding = sharding.state_shardings(jax.eval_shape(init, jax.random.key(0)), params_sharding, mesh)
    self.init_fn = sharding.Program(init, mesh, out_shardings=state_sharding)
    self.train_fn = sharding.Program(
        functools.partial(step.train_step, model=model, tx=tx, grad_accum_steps=k,
                          objective=objectives.from_config(config.objective)), mesh,
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (B, T + 1), dtype=np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((B, T), bool),
            "segment_ids": np.ones((B, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}
    self.batch = jax.device_put(host, sharding.batch_sharding(mesh))
    self.state = None

  def compile(self) -> float:
    """Seconds to lower and compile the train step (also initialises the state)."""
    self.state = self.init_fn(jax.random.key(self.config.seed))
    t0 = time.perf_counter()
    self.compiled = self.train_fn.compile(self.state, self.batch)
    self.compile_seconds = time.perf_counter() - t0
    return self.compile_seconds

  def run(self, steps: int, sync_every_step: bool = True) -> float:
    """Seconds per step over `steps` steps. sync_every_step reads the loss back each step, as
    nanoGPT's `loss.item()` does (the real loop syncs only every log_every_steps)."""
    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, self.batch)
      if sync_every_step:
        float(metrics["loss"])
    jax.block_until_ready(self.state)
    self.last_loss = float(metrics["loss"])
    return (time.perf_counter() - t0) / steps

  def peak_memory_bytes(self) -> tuple[int | None, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      return stats["peak_bytes_in_use"], "device peak_bytes_in_use"
    m = self.compiled.memory_analysis()  # CPU: the compiler's static plan for one step
    if m is None:
      return None, "unavailable"
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return total, "compiled memory_analysis (args+outputs+temps-aliased)"

  def flops_per_token(self) -> float:
    return flops_per_token(self.model_cfg, self.config.data.context_length)

  def mfu(self, seconds_per_step: float) -> float | None:
    peak = hardware.peak_flops_per_device(self.config.model.compute_dtype)
    if not peak:
      return None
    achieved = self.tokens_per_step * self.flops_per_token() / seconds_per_step
    return achieved / (peak * len(self.mesh.devices.flat))


def fmt_bytes(n) -> str:
  return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def main(argv, config_flag, steps_flag, repeats_flag) -> None:
  del argv
  config = config_flag.value
  bench = StepBench(config, vocab_size=config.data.tokenizer.vocab_size)
  compile_s = bench.compile()
  bench.run(3)  # warm-up
  times = [bench.run(steps_flag.value) for _ in range(repeats_flag.value)]
  dt = statistics.median(times)
  mem, how = bench.peak_memory_bytes()
  mfu = bench.mfu(dt)
  peak = hardware.peak_flops_per_device(config.model.compute_dtype)
  print(f"device {jax.device_count()} x {jax.devices()[0].device_kind} | mesh {dict(bench.mesh.shape)} | "
        f"params {count_params(bench.state.params):,} | {config.model.compute_dtype} compute | "
        f"peak {'%.0f TFLOP/s' % (peak / 1e12) if peak else 'unknown (no MFU)'}")
  print(f"{'tokens/step':>12} {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'compile s':>10} {'peak memory':>14}")
  print(f"{bench.tokens_per_step:>12,} {dt * 1e3:>9.2f} {bench.tokens_per_step / dt:>11,.0f} "
        f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%':>7} {compile_s:>10.2f} {fmt_bytes(mem):>14}")
  print(f"(median of {repeats_flag.value} x {steps_flag.value} steps; memory: {how}; "
        f"FLOPs/token {bench.flops_per_token() / 1e6:.1f} M = 6N + 12*L*D*T)")


def cli() -> None:
  config_flag = launch.define_config_flag()
  steps = flags.DEFINE_integer("steps", 20, "Timed steps per repeat.")
  repeats = flags.DEFINE_integer("repeats", 3, "Repeats (the median is reported).")
  app.run(functools.partial(main, config_flag=config_flag, steps_flag=steps, repeats_flag=repeats),
          flags_parser=launch.parse_flags)


if __name__ == "__main__":
  cli()
