"""Importing a sharded Hugging Face checkpoint: time and memory on 1 and 8 (simulated) devices.

    python experiments/bench_import.py [--layers=8] [--width=512] [--vocab=32000] [--shard_mb=64]

Writes a random Llama-architecture checkpoint (float32, untied head, sharded at --shard_mb with
model.safetensors.index.json) with this package's own exporter, then in a fresh process per device
count imports it with `hf.load.import_model` onto a (1,1,1) or (2,2,2) mesh (in a fresh process, and
in one that imported a tiny checkpoint first: the runtime's one-time costs paid) and reports: the wall
time (the first import, compile included, and a second one), the placed arrays' bytes (every
device's shards: replicated norms count once per device), and anonymous memory (RssAnon, sampled
every 2 ms, from before the import to its peak and after it). File pages that safetensors maps are
not anonymous and do not count. Target (issue 29): RssAnon above the placed arrays' own bytes at
most 1.5x the largest tensor, i.e. never a second full copy of the model. On CPU the placed arrays
are themselves anonymous host memory, so "above" subtracts them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_LAYERS = flags.DEFINE_integer("layers", 8, "Transformer blocks.")
_WIDTH = flags.DEFINE_integer("width", 512, "Hidden size (8 heads, 4 kv heads; SwiGLU 3x width).")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary (the embedding and the untied head: the largest tensors).")
_SHARD_MB = flags.DEFINE_integer("shard_mb", 64, "Largest safetensors file of the checkpoint, MiB.")


def rss_anon() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("RssAnon:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no RssAnon in /proc/self/status")


def write_checkpoint(path: str, layers: int, width: int, vocab: int, shard_mb: int) -> dict:
  import jax
  import numpy as np

  from lmobjective.hf import export, load
  from lmobjective.model import Transformer
  hf = {"model_type": "llama", "hidden_size": width, "num_attention_heads": 8, "num_key_value_heads": 4,
        "num_hidden_layers": layers, "intermediate_size": 3 * width, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
  cfg = load.model_config(hf, "config.json")
  shapes = load.nn_unboxed_shapes(Transformer(cfg))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02), shapes)
  export.write(params, cfg, path, bos_id=0, eos_id=1, max_shard_size=shard_mb << 20)
  sizes = [int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(shapes)]
  return {"bytes": sum(sizes), "largest_tensor": max(sizes), "params": sum(sizes) // 4}


def measure(path: str, warm_path: str | None = None) -> dict:
  """In this process (its XLA_FLAGS set by the parent): two imports, time and RssAnon. With `warm_path`
  (a tiny checkpoint of the same architecture) imported first, the runtime's one-time costs (thread pools,
  the compiler itself) are paid before the baseline is read."""
  import jax

  from lmobjective import sharding
  from lmobjective.hf import load
  n = jax.device_count()
  shape = (2, 2, 2) if n == 8 else (1, 1, 1)
  mesh = jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  jax.block_until_ready(jax.numpy.zeros(8) + 1)  # the runtime's own allocations before the baseline
  if warm_path is not None:
    jax.block_until_ready(load.import_model(warm_path, mesh=mesh)[1])
  out = {"devices": n, "mesh": list(shape)}
  for attempt in ("first", "second"):
    base, peak, stop = rss_anon(), [0], threading.Event()

    def sample():
      while not stop.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.002)
    t = threading.Thread(target=sample)
    t.start()
    start = time.perf_counter()
    _, params, _ = load.import_model(path, mesh=mesh)
    jax.block_until_ready(params)
    wall = time.perf_counter() - start
    stop.set()
    t.join()
    after = rss_anon()
    placed = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
    out[attempt] = {"wall_s": wall, "placed_bytes": placed, "rss_anon_peak_above_base": max(peak[0], after) - base,
                    "rss_anon_after_above_base": after - base}
    del params
  return out


def main(argv) -> None:
  if len(argv) > 2 and argv[1] == "--measure":
    print(json.dumps(measure(argv[2], argv[3] if len(argv) > 3 else None)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "llama")
    start = time.perf_counter()
    info = write_checkpoint(path, _LAYERS.value, _WIDTH.value, _VOCAB.value, _SHARD_MB.value)
    warm = os.path.join(tmp, "tiny")
    write_checkpoint(warm, 2, 64, 512, _SHARD_MB.value)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    print(f"checkpoint: llama, {_LAYERS.value} layers, width {_WIDTH.value}, vocab {_VOCAB.value}: "
          f"{info['params']:,} params, {info['bytes'] / 2**20:.1f} MiB in {len(files)} files, largest tensor "
          f"{info['largest_tensor'] / 2**20:.1f} MiB (written in {time.perf_counter() - start:.1f} s)")
    print("| devices | mesh | process | import | placed | RssAnon peak above placed | / largest tensor | target <= 1.5x |")
    print("|---|---|---|---|---|---|---|---|")
    for devices, warmed in ((1, False), (1, True), (8, False), (8, True)):
      env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", path] + ([warm] if warmed else []),
                            env=env, capture_output=True, text=True)
      if proc.returncode:
        sys.exit(proc.stderr[-3000:])
      got = json.loads(proc.stdout.strip().splitlines()[-1])
      for attempt in ("first", "second"):
        g = got[attempt]
        extra = g["rss_anon_peak_above_base"] - g["placed_bytes"]
        ratio = extra / info["largest_tensor"]
        process = "after a tiny import" if warmed else "fresh"
        print(f"| {devices} | {tuple(got['mesh'])} | {process} | {g['wall_s']:.2f} s ({attempt}; "
              f"{info['bytes'] / 2**20 / g['wall_s']:.0f} MiB/s) | {g['placed_bytes'] / 2**20:.1f} MiB | "
              f"{extra / 2**20:+.1f} MiB | {ratio:.2f}x | {'met' if ratio <= 1.5 else 'NOT met'} |")


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[1] == "--measure":
    main(sys.argv)
  else:
    app.run(main)
