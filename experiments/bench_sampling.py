"""Sampling throughput: lmobjective's sampler against Hugging Face transformers' `generate`, side by side.

    pip install -e '.[bench]'        # torch==2.13.0 (the CPU build) and transformers
    python experiments/bench_sampling.py                  # cpu shape
    python experiments/bench_sampling.py --shape=gpu      # on a GPU (experiments/gpu_check.sh runs it)

Both sides run the same model: configs/default.py's architecture (RoPE, RMSNorm, SwiGLU, tied
embeddings: transformers' `LlamaForCausalLM`) at the shape below, randomly initialised by
lmobjective and copied into transformers (nothing is downloaded); the two sides' logits on the
prompts are compared before anything is timed. Prompts of 64 random ids, 128 new tokens, batch 1
and 32, greedy and sampled (temperature 1, no truncation). No stop token: every row generates all
128 tokens on both sides. transformers runs `generate` with its KV cache (the default dynamic
cache, sdpa attention, under `torch.inference_mode`); lmobjective runs `sampling.Sampler` (one
jitted prefill + while-loop program, results read back to the host).

Each side lives in its own worker process (no shared thread pool); the parent alternates rounds
between them and reports the median seconds per `generate` call, new tokens per second, and the
ratio lmobjective / transformers. The first call of each setting is not timed: lmobjective's trace
and XLA compile before it is reported apart ("compile"), as is transformers' warm-up call.

Shapes:
  cpu  configs/default.py's model: 4 layers, 256 wide, 4 heads, SwiGLU 704, vocabulary 2,048, float32.
  gpu  12 layers, 768 wide, 12 heads (4 kv heads), SwiGLU 2,048, vocabulary 32,000, bfloat16
       compute on both sides (lmobjective: bf16 compute, f32 weights; transformers: bf16 weights).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_SHAPE = flags.DEFINE_enum("shape", "cpu", ["cpu", "gpu"], "Benchmark shape (see the module docstring).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds per setting (median reported).")
_CALLS = flags.DEFINE_integer("calls", 1, "generate calls per round and side.")
_BATCHES = flags.DEFINE_list("batches", ["1", "32"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_tokens", 64, "Tokens per prompt.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
_MODES = flags.DEFINE_list("modes", ["greedy", "sampled"], "greedy | sampled (temperature 1).")
_JSON = flags.DEFINE_string("json", None, "Also write the results here.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run as a worker (jax | torch).")
_DIR = flags.DEFINE_string("dir", None, "Internal: the workers' shared folder (weights, logits).")

SHAPES = {
    "cpu": dict(num_layers=4, embed_dim=256, num_heads=4, num_kv_heads=4, mlp_dim=704, vocab_size=2048,
                compute_dtype="float32"),
    "gpu": dict(num_layers=12, embed_dim=768, num_heads=12, num_kv_heads=4, mlp_dim=2048, vocab_size=32000,
                compute_dtype="bfloat16"),
}


def _shape() -> dict:
  return dict(SHAPES[_SHAPE.value], max_len=_PROMPT.value + _NEW.value)


def _prompts(batch: int):
  import numpy as np
  return np.random.default_rng(0).integers(1, _shape()["vocab_size"], (batch, _PROMPT.value)).astype(np.int64)


def _serve(generate, info: dict, prepare=None) -> None:
  """Worker loop: a line {"mode", "batch", "calls"} in; {"seconds"} per call out (`prepare` untimed)."""
  print(json.dumps({"ready": True, **info}), flush=True)
  for line in sys.stdin:
    req = json.loads(line)
    if prepare:
      prepare(req["mode"], req["batch"])
    t0 = time.perf_counter()
    for _ in range(req["calls"]):
      generate(req["mode"], req["batch"])
    print(json.dumps({"seconds": (time.perf_counter() - t0) / req["calls"]}), flush=True)


# ---- lmobjective -----------------------------------------------------------------------------------


def _jax_worker(folder: str) -> None:
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np

  from lmobjective import config as config_lib
  from lmobjective import sampling, sharding
  from lmobjective.model import ModelConfig, Transformer

  shape = _shape()
  section = config_lib.typed(config_lib.load_config_file(config_lib.DEFAULT_CONFIG)).model
  base = ModelConfig.from_config(section, shape["vocab_size"], shape["max_len"])
  cfg = dataclasses.replace(base, **{k: v for k, v in shape.items() if k != "compute_dtype"},
                            compute_dtype=getattr(jnp, shape["compute_dtype"]))
  model = Transformer(cfg)
  params = jax.jit(lambda k: jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                                          model.init(k, jnp.zeros((1, 8), jnp.int32))["params"],
                                          is_leaf=lambda x: hasattr(x, "value")))(jax.random.key(0))
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v, np.float32)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(os.path.join(folder, "params.npz"), **flat)
  prompts = _prompts(max(map(int, _BATCHES.value)))
  logits = jax.jit(model.apply)({"params": params}, jnp.asarray(prompts[:2], jnp.int32))
  np.save(os.path.join(folder, "logits.npy"), np.asarray(logits, np.float32))
  sampler = sampling.Sampler(model, sharding.single_device_mesh(), bucket=_PROMPT.value)
  settings = {m: sampling.SamplingConfig(max_new_tokens=_NEW.value, temperature=0.0 if m == "greedy" else 1.0)
              for m in ("greedy", "sampled")}
  calls = iter(range(1 << 30))

  compiled = set()

  def prepare(mode, batch):
    if (mode, batch) not in compiled:  # before the first call: trace + XLA compile, timed apart
      t0 = time.perf_counter()
      sampler.compile(params, prompts[:batch].tolist(), settings[mode])
      compiled.add((mode, batch))
      print(json.dumps({"compile_s": time.perf_counter() - t0}), flush=True)

  def generate(mode, batch):
    samples, _, _ = sampler(params, prompts[:batch].tolist(), settings[mode], seed=0, iteration=next(calls))
    tokens = np.asarray(samples.tokens)
    assert tokens.shape == (batch, _NEW.value) and samples.response_mask.all()  # every row ran to the end

  _serve(generate, {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}, prepare)


# ---- transformers ----------------------------------------------------------------------------------


def _to_llama(flat: dict, shape: dict) -> dict:
  """lmobjective's params as transformers' LlamaForCausalLM state dict (kernels [in, ...out] -> weight [out, in])."""
  import torch
  D, N, K = shape["embed_dim"], shape["num_heads"], shape["num_kv_heads"]
  H = D // N
  t = lambda a: torch.from_numpy(a)
  sd = {"model.embed_tokens.weight": t(flat["token_embed/embedding"]), "model.norm.weight": t(flat["final_norm/scale"])}
  for i in range(shape["num_layers"]):
    b, o = f"block_{i}/", f"model.layers.{i}."
    sd[o + "input_layernorm.weight"] = t(flat[b + "attn_norm/scale"])
    sd[o + "post_attention_layernorm.weight"] = t(flat[b + "mlp_norm/scale"])
    for ours, theirs, width in (("query", "q_proj", N * H), ("key", "k_proj", K * H), ("value", "v_proj", K * H)):
      sd[o + f"self_attn.{theirs}.weight"] = t(flat[b + f"attn/{ours}/kernel"].reshape(D, width).T.copy())
    sd[o + "self_attn.o_proj.weight"] = t(flat[b + "attn/out/kernel"].reshape(N * H, D).T.copy())
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
      sd[o + f"mlp.{theirs}.weight"] = t(flat[b + f"mlp/{ours}/kernel"].T.copy())
  sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
  return sd


def _torch_worker(folder: str) -> None:
  import numpy as np
  import torch
  import transformers

  shape = _shape()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.bfloat16 if shape["compute_dtype"] == "bfloat16" else torch.float32
  torch.set_num_threads(os.cpu_count() or 1)
  config = transformers.LlamaConfig(
      vocab_size=shape["vocab_size"], hidden_size=shape["embed_dim"], intermediate_size=shape["mlp_dim"],
      num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
      num_key_value_heads=shape["num_kv_heads"], head_dim=shape["embed_dim"] // shape["num_heads"],
      max_position_embeddings=shape["max_len"], rms_norm_eps=1e-6, rope_theta=10_000.0,
      tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu")
  model = transformers.LlamaForCausalLM(config).eval()
  with np.load(os.path.join(folder, "params.npz")) as z:
    missing, unexpected = model.load_state_dict(_to_llama(dict(z), shape), strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  model.tie_weights()
  model = model.to(device=device, dtype=dtype)
  prompts = torch.from_numpy(_prompts(max(map(int, _BATCHES.value)))).to(device)
  with torch.inference_mode():
    ours = np.load(os.path.join(folder, "logits.npy"))
    theirs = model(prompts[:2]).logits.float().cpu().numpy()
  max_diff = float(np.abs(ours - theirs).max())
  gen = dict(max_new_tokens=_NEW.value, min_new_tokens=_NEW.value, use_cache=True, pad_token_id=0,
             eos_token_id=None)  # transformers 5: no top-k or top-p unless asked

  def generate(mode, batch):
    with torch.inference_mode():
      ids = prompts[:batch]
      out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=mode == "sampled",
                           temperature=1.0 if mode == "sampled" else None, **gen)
    if device == "cuda":
      torch.cuda.synchronize()
    assert out.shape == (batch, _PROMPT.value + _NEW.value)

  _serve(generate, {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "threads": torch.get_num_threads(), "max_abs_logit_diff": max_diff,
                    "logit_scale": float(np.abs(ours).max())})


# ---- the parent ------------------------------------------------------------------------------------


class _Worker:
  def __init__(self, kind: str, folder: str):
    args = [sys.executable, os.path.abspath(__file__), f"--worker={kind}", f"--dir={folder}",
            f"--shape={_SHAPE.value}", f"--prompt_tokens={_PROMPT.value}", f"--new_tokens={_NEW.value}",
            f"--batches={','.join(_BATCHES.value)}"]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"worker {self.proc.args[2]} exited with {self.proc.wait()}")
    return json.loads(line)

  def run(self, mode: str, batch: int, calls: int) -> float:
    self.proc.stdin.write(json.dumps({"mode": mode, "batch": batch, "calls": calls}) + "\n")
    self.proc.stdin.flush()
    reply = self._read()
    while "compile_s" in reply:
      self.compile_s = reply["compile_s"]
      reply = self._read()
    return reply["seconds"]

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def main(argv):
  del argv
  if _WORKER.value:
    return {"jax": _jax_worker, "torch": _torch_worker}[_WORKER.value](_DIR.value)
  with tempfile.TemporaryDirectory() as folder:
    jax_w = _Worker("jax", folder)  # writes the weights and its logits first
    torch_w = _Worker("torch", folder)
    print(f"shape {_SHAPE.value}: {json.dumps(_shape())}")
    print(f"lmobjective: {json.dumps(jax_w.info)}")
    print(f"transformers: {json.dumps(torch_w.info)}")
    diff, scale = torch_w.info["max_abs_logit_diff"], torch_w.info["logit_scale"]
    print(f"same model on both sides: max |logit difference| {diff:.2e} (logits up to {scale:.2f})")
    if diff > 1e-3 * max(scale, 1.0) and _SHAPE.value == "cpu":
      raise SystemExit("the two models differ: the weight mapping is wrong")
    rows = []
    for mode in _MODES.value:
      for batch in map(int, _BATCHES.value):
        first = {"lmobjective": jax_w.run(mode, batch, 1), "transformers": torch_w.run(mode, batch, 1)}
        compile_s = jax_w.compile_s
        times = {"lmobjective": [], "transformers": []}
        for r in range(_ROUNDS.value):  # alternate, and alternate who goes first
          order = [("lmobjective", jax_w), ("transformers", torch_w)][::1 if r % 2 == 0 else -1]
          for name, w in order:
            times[name].append(w.run(mode, batch, _CALLS.value))
        med = {k: statistics.median(v) for k, v in times.items()}
        tps = {k: batch * _NEW.value / v for k, v in med.items()}
        rows.append({"mode": mode, "batch": batch, "seconds": med, "tokens_per_s": tps, "first_call_s": first,
                     "lmobjective_compile_s": compile_s,
                     "ratio": tps["lmobjective"] / tps["transformers"], "rounds": times})
        print(f"{mode:>7} batch {batch:>3}: lmobjective {tps['lmobjective']:>9,.0f} tok/s ({med['lmobjective']:.3f} s/call) | "
              f"transformers {tps['transformers']:>9,.0f} tok/s ({med['transformers']:.3f} s/call) | "
              f"ratio {tps['lmobjective'] / tps['transformers']:.2f}x | lmobjective compile {compile_s:.1f} s | "
              f"first call after it {first['lmobjective']:.2f} s, transformers' {first['transformers']:.2f} s", flush=True)
    jax_w.close()
    torch_w.close()
  print("\n| mode | batch | lmobjective tok/s | transformers tok/s | ratio | lmobjective compile (s) |")
  print("|---|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['mode']} | {r['batch']} | {r['tokens_per_s']['lmobjective']:,.0f} | {r['tokens_per_s']['transformers']:,.0f} | "
          f"{r['ratio']:.2f}x | {r['lmobjective_compile_s']:.1f} |")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"shape": _SHAPE.value, "model": _shape(), "lmobjective": jax_w.info,
                 "transformers": torch_w.info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
