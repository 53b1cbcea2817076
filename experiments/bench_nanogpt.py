"""lmobjective vs nanoGPT, side by side in one run, same model shape, same optimizer, same batch.

    # nanoGPT's source stays outside this repository:
    python experiments/bench_nanogpt.py --nanogpt_path=/tmp/nanogpt --shape=cpu
    python experiments/bench_nanogpt.py --nanogpt_path=/path/to/nanoGPT --shape=gpu   # on a GPU

Shapes:
  cpu  nanoGPT's README CPU run: 4 layers, 4 heads, 128 wide, T=64, batch 12, char vocab 65,
       dropout 0, no biases, float32.
  gpu  nanoGPT's bench.py: GPT-2 124M (12 layers, 12 heads, 768 wide), T=1024, V=50,304, batch 12,
       no biases, bf16 (nanoGPT: autocast + torch.compile; lmobjective: bf16 compute, f32 weights).

Both sides run the same training step: forward, backward, global-norm clip 1.0, AdamW
(b2 0.95, weight decay 0.1 on matrices), read the loss back to the host every step
(nanoGPT's `loss.item()`), on a fixed random batch already on the device. Each framework runs
in its own long-lived worker process (no shared thread pools); the parent alternates
"run N steps" requests between them for several rounds, so background load hits all of them
alike, and reports the median tokens/s. On the cpu shape lmobjective also runs with the host's
cores as 2 XLA devices (`--xla_force_host_platform_device_count=2`, mesh data=2): each device
steps half the batch and the gradients are all-reduced. nanoGPT runs eager (default threads, and one thread),
and, when it compiles, with torch.compile; the ratio is taken against the fastest of them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

_PATH = flags.DEFINE_string("nanogpt_path", "/tmp/nanogpt", "A nanoGPT checkout (its model.py is imported).")
_SHAPE = flags.DEFINE_enum("shape", "cpu", ["cpu", "gpu"], "Benchmark shape (see the module docstring).")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds (median reported).")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run as a worker (jax | jax_dp2 | torch_eager | torch_eager_1t | torch_compile).")
_SKIP_COMPILE = flags.DEFINE_bool("skip_torch_compile", False, "Do not try torch.compile.")

SHAPES = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65,
                dtype="float32"),
    "gpu": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12, vocab_size=50304,
                dtype="bfloat16"),
}
LR, WD, B1, B2, CLIP = 1e-3, 0.1, 0.9, 0.95, 1.0


# ---- workers: read "N" from stdin, run N steps, print {"seconds": ...} --------------------------

def _serve(run_steps, info: dict) -> None:
  print(json.dumps({"ready": True, **info}), flush=True)
  for line in sys.stdin:
    n = int(line)
    t0 = time.perf_counter()
    loss = run_steps(n)
    print(json.dumps({"seconds": time.perf_counter() - t0, "loss": loss}), flush=True)


def jax_worker(shape: dict, data_parallel: int = 1) -> None:
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  from experiments.bench_step import StepBench
  from lmobjective.config import load_config_file

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = load_config_file(os.path.join(root, "configs/default.py"))
  c.model.num_layers, c.model.num_heads, c.model.embed_dim = shape["n_layer"], shape["n_head"], shape["n_embd"]
  c.data.context_length = shape["block_size"]
  c.model.vocab_size = shape["vocab_size"]
  c.model.position, c.model.norm, c.model.mlp = "learned", "layernorm", "gelu"
  c.model.use_bias, c.model.tie_embeddings, c.model.dropout = False, True, 0.0
  c.model.compute_dtype = shape["dtype"]
  c.train.batch_size = shape["batch_size"]
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data_parallel, 1, 1
  c.optimizer.learning_rate, c.optimizer.weight_decay, c.optimizer.grad_clip = LR, WD, CLIP
  c.optimizer.b1, c.optimizer.b2, c.optimizer.schedule, c.optimizer.warmup_steps = B1, B2, "constant", 0
  bench = StepBench(c)
  compile_s = bench.compile()
  bench.run(3)
  mem, _ = bench.peak_memory_bytes()

  def run_steps(n):
    bench.run(n, sync_every_step=True)
    return bench.last_loss
  _serve(run_steps, {"compile_seconds": compile_s, "params": sum(x.size for x in __import__("jax").tree.leaves(bench.state.params)),
                     "peak_memory": mem, "flops_per_token": bench.flops_per_token()})


def torch_worker(shape: dict, compile_model: bool, threads: int | None = None) -> None:
  import torch

  if threads:  # a single thread avoids OpenMP barrier spinning when the cores are oversubscribed
    torch.set_num_threads(threads)

  sys.path.insert(0, _PATH.value)
  from model import GPT, GPTConfig  # nanoGPT's model.py

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(1337)
  cfg = GPTConfig(block_size=shape["block_size"], vocab_size=shape["vocab_size"], n_layer=shape["n_layer"],
                  n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=0.0, bias=False)
  model = GPT(cfg).to(device)
  opt = model.configure_optimizers(weight_decay=WD, learning_rate=LR, betas=(B1, B2), device_type=device)
  if device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  ctx = (torch.amp.autocast(device_type=device, dtype=torch.bfloat16) if shape["dtype"] == "bfloat16"
         else torch.autocast(device_type=device, enabled=False))
  t0 = time.perf_counter()
  if compile_model:
    model = torch.compile(model)
  B, T = shape["batch_size"], shape["block_size"]
  x = torch.randint(shape["vocab_size"], (B, T), device=device)
  y = torch.randint(shape["vocab_size"], (B, T), device=device)

  def run_steps(n):
    for _ in range(n):  # nanoGPT train.py's step (without its GradScaler, a no-op for f32/bf16)
      with ctx:
        _, loss = model(x, y)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
      opt.step()
      opt.zero_grad(set_to_none=True)
      lossf = loss.item()
    if device == "cuda":
      torch.cuda.synchronize()
    return lossf
  run_steps(3)  # warm-up (and compilation)
  compile_s = time.perf_counter() - t0
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  _serve(run_steps, {"compile_seconds": compile_s if compile_model else None,
                     "params": sum(p.numel() for p in model.parameters()), "peak_memory": peak})


# ---- parent: start workers, alternate, report ---------------------------------------------------

class Worker:
  def __init__(self, name: str):
    self.name = name
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={name}", f"--shape={_SHAPE.value}",
           f"--nanogpt_path={_PATH.value}"]
    env = dict(os.environ)
    if name == "jax_dp2":  # the host's cores as 2 XLA devices, one batch half each (mesh data=2)
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.info = self._read()

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith("{"):
        return json.loads(line)
    raise RuntimeError(f"worker {self.name} exited with {self.proc.wait()}")

  def run(self, steps: int) -> dict:
    self.proc.stdin.write(f"{steps}\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def parent() -> None:
  shape = SHAPES[_SHAPE.value]
  if not os.path.exists(os.path.join(_PATH.value, "model.py")):
    sys.exit(f"error: no nanoGPT model.py under --nanogpt_path={_PATH.value}")
  names = ["jax", "torch_eager", "torch_eager_1t"] + ([] if _SKIP_COMPILE.value else ["torch_compile"])
  if _SHAPE.value == "cpu":
    names.insert(1, "jax_dp2")
  workers = {}
  for name in names:
    try:
      workers[name] = Worker(name)
    except RuntimeError as e:
      print(f"[{name} unavailable: {e}]")
  tokens = shape["batch_size"] * shape["block_size"]
  per = {name: [] for name in workers}
  for r in range(_ROUNDS.value):
    for name, w in workers.items():
      per[name].append(tokens * _STEPS.value / w.run(_STEPS.value)["seconds"])
    print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:,.0f} tok/s" for n, v in per.items()), flush=True)
  for w in workers.values():
    w.close()
  labels = {"jax": "lmobjective (JAX)", "jax_dp2": "lmobjective, 2 CPU devices", "torch_eager": "nanoGPT eager", "torch_eager_1t": "nanoGPT eager 1 thread",
            "torch_compile": "nanoGPT torch.compile"}
  med = {n: statistics.median(v) for n, v in per.items()}
  flops_tok = workers["jax"].info["flops_per_token"]
  print(f"\nshape {_SHAPE.value}: {shape} | {tokens} tokens/step | {_ROUNDS.value} rounds x {_STEPS.value} steps, "
        f"alternating | FLOPs/token {flops_tok / 1e6:.2f} M (6N + 12*L*D*T)")
  print(f"{'framework':<28} {'params':>11} {'median tok/s':>13} {'min':>9} {'max':>9} {'ms/step':>8} "
        f"{'GFLOP/s':>8} {'compile s':>9} {'peak mem':>10}")
  for n in per:
    info = workers[n].info
    mem = "n/a" if info.get("peak_memory") is None else f"{info['peak_memory'] / 2**20:.0f} MiB"
    comp = "n/a" if info.get("compile_seconds") is None else f"{info['compile_seconds']:.1f}"
    print(f"{labels[n]:<28} {info['params']:>11,} {med[n]:>13,.0f} {min(per[n]):>9,.0f} {max(per[n]):>9,.0f} "
          f"{1e3 * tokens / med[n]:>8.2f} {med[n] * flops_tok / 1e9:>8.1f} {comp:>9} {mem:>10}")
  torch_best = max((n for n in per if n.startswith("torch")), key=lambda n: med[n])
  for n in (n for n in per if n.startswith("jax")):
    print(f"ratio {labels[n]} / {labels[torch_best]} = {med[n] / med[torch_best]:.2f}x "
          f"(median tokens/s; per round: "
          + ", ".join(f"{a / b:.2f}" for a, b in zip(per[n], per[torch_best])) + ")")


def main(argv) -> None:
  del argv
  if _WORKER.value in ("jax", "jax_dp2"):
    jax_worker(SHAPES[_SHAPE.value], data_parallel=2 if _WORKER.value == "jax_dp2" else 1)
  elif _WORKER.value in ("torch_eager", "torch_eager_1t", "torch_compile"):
    torch_worker(SHAPES[_SHAPE.value], compile_model=_WORKER.value == "torch_compile",
                 threads=1 if _WORKER.value == "torch_eager_1t" else None)
  else:
    parent()


if __name__ == "__main__":
  app.run(main)
