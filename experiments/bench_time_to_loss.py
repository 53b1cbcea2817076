"""Wall-clock time to nanoGPT's validation loss, lmobjective against nanoGPT, one machine, one run.

    python experiments/bench_time_to_loss.py --nanogpt_path=/tmp/nanogpt [--text=FILE] [--seeds=3]
    python experiments/bench_time_to_loss.py --target_loss=2.0 --rows=char_fast   # no nanoGPT: a given L*

Rows (each run --seeds times, in its own fresh process and workdir):
  nanogpt      nanoGPT's README CPU command (train_shakespeare_char with 4 layers, 4 heads, 128 wide,
               T = 64, batch 12, 2000 iterations, no dropout, --compile=False), its own train.py, on
               FILE prepared as its prepare.py does (character vocabulary, 90/10 split), with
               always_save_checkpoint so that every evaluation (every 250 iterations) leaves a checkpoint.
  like         lmobjective with nanoGPT's exact hyper-parameters (`configs/char_fast.py:nanogpt`).
  char_fast    lmobjective's `configs/char_fast.py` preset, on one XLA device unless --cpu_devices says.

One evaluator for all: the non-overlapping windows of 65 characters (64 inputs, 64 targets) that tile
the part of FILE both sides hold out (nanoGPT's last 10 %, which starts at or after lmobjective's
cut at a line break), scored on each saved checkpoint offline (untimed) with that side's own model
code: nanoGPT's `GPT` for its checkpoints, `model.apply` for lmobjective's. The loss is the mean
cross-entropy, nats per character, over every target of every window.

L* is the median over nanoGPT's seeds of each seed's best loss on those windows. A run's time to L*
is the wall-clock from the moment its process was started to the moment its first checkpoint with
loss <= L* was on disk (import, compilation, data, its own evaluations and checkpoint writes
included; nanoGPT evaluates and saves every 250 iterations, lmobjective at its config's cadence);
"not reached" if none is. Each row reports the median over seeds of the time to L*, the ratio to
nanoGPT's, the tokens to L*, the best loss and the training tokens/s.

The default FILE is the project's `prose` source (the standard library's docstrings and pydoc
topics) written out as ASCII: on every machine with Python, no download. nanoGPT stays outside the
repository (fetch karpathy/nanoGPT anywhere; PyTorch is needed for its rows only).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_TEXT = flags.DEFINE_string("text", None, "A UTF-8 text file; default: the prose source written out (ASCII).")
_NANOGPT = flags.DEFINE_string("nanogpt_path", "/tmp/nanogpt", "A nanoGPT checkout (its train.py and model.py).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_time_to_loss", "Where the runs go (emptied first).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Runs per row (median reported).")
_ROWS = flags.DEFINE_list("rows", ["nanogpt", "like", "char_fast"], "Rows to run: nanogpt, like, char_fast.")
_TARGET = flags.DEFINE_float("target_loss", None, "L* to use instead of nanoGPT's (then the nanogpt row may be left out).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "lmobjective's char_fast row: the launcher's --cpu_devices (0: JAX's default, one device; 2 was slower for this preset: docs/benchmarks.md).")
_OVERRIDES = flags.DEFINE_multi_string("lmo", [], "Extra KEY=VALUE (--config.KEY=VALUE) for the lmobjective rows, e.g. train.steps=300.")
_NANO_ARGS = flags.DEFINE_multi_string("nano", [], "Extra --KEY=VALUE for nanoGPT's train.py (e.g. max_iters=100).")
_NANO_DEVICE = flags.DEFINE_string("nanogpt_device", "cpu", "nanoGPT's --device (cuda on a GPU machine: then it also compiles).")
_MAX_CHARS = flags.DEFINE_integer("max_chars", None, "Use only the first this many characters of FILE (dry runs).")

WINDOW = 64
NANOGPT_CPU = ["--eval_iters=20", "--log_interval=1", "--block_size=64",
               "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
               "--lr_decay_iters=2000", "--dropout=0.0"]  # nanoGPT README, "I only have a macbook"

# Runs nanoGPT's own train.py; each checkpoint goes to ckpt_<iter>.pt with the time it was on disk,
# and torch.manual_seed gets the seed offset (train.py has no seed flag: it seeds 1337 + rank).
_NANO_WRAPPER = r"""
import json, os, runpy, sys, time, torch
path, seed = sys.argv[1], int(sys.argv[2])
sys.argv = [os.path.join(path, "train.py")] + sys.argv[3:]
sys.path.insert(0, path)
save, seed_fn = torch.save, torch.manual_seed
def saved(obj, f, *a, **k):
  it = obj["iter_num"]
  out = os.path.join(os.path.dirname(f), f"ckpt_{it}.pt")
  save(obj, out, *a, **k)
  with open(os.path.join(os.path.dirname(f), "saves.jsonl"), "a") as log:
    log.write(json.dumps({"iter": it, "time": time.time(), "path": out}) + "\n")
torch.save = saved
torch.manual_seed = lambda s: seed_fn(s + seed)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def prose_text() -> str:
  from lmobjective.data import stdlib_corpus
  docs = stdlib_corpus.prose_documents(lambda p: open(p, encoding="utf-8", errors="replace").read())
  return "\n\n".join(docs).encode("ascii", "ignore").decode("ascii")


def prepare(text: str, data_dir: str) -> int:
  """nanoGPT's data/shakespeare_char/prepare.py on `text`; returns its train/val cut (a character offset)."""
  os.makedirs(data_dir, exist_ok=True)
  chars = sorted(set(text))
  stoi = {ch: i for i, ch in enumerate(chars)}
  n = len(text)
  for name, part in (("train", text[:int(n * 0.9)]), ("val", text[int(n * 0.9):])):
    np.array([stoi[c] for c in part], dtype=np.uint16).tofile(os.path.join(data_dir, f"{name}.bin"))
  with open(os.path.join(data_dir, "meta.pkl"), "wb") as f:
    pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
  return int(n * 0.9)


def windows(text: str) -> list[str]:
  """The evaluator's windows: 65-character tiles of the text both sides hold out."""
  from lmobjective.data.sources import _tail_split
  start = max(int(len(text) * 0.9), len(_tail_split(text, 0.1)[0]))
  return [text[s:s + WINDOW + 1] for s in range(start, len(text) - WINDOW, WINDOW + 1)]


# ---- the evaluator -------------------------------------------------------------------------------

def score_nanogpt(ckpt_path: str, wins: list[str], stoi: dict, nanogpt_path: str) -> float:
  import torch
  sys.path.insert(0, nanogpt_path)
  from model import GPT, GPTConfig
  ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
  model = GPT(GPTConfig(**ckpt["model_args"]))
  model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
  model.eval()
  ids = torch.tensor([[stoi[c] for c in w] for w in wins], dtype=torch.long)
  total = 0.0
  with torch.no_grad():
    for i in range(0, len(ids), 256):
      x, y = ids[i:i + 256, :-1].contiguous(), ids[i:i + 256, 1:].contiguous()
      logits, _ = model(x, y)  # with targets, GPT returns the logits of every position
      total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                                 reduction="sum").item()
  return total / (len(wins) * WINDOW)


def score_lmobjective(workdir: str, step: int, wins: list[str]) -> float:
  import jax
  import jax.numpy as jnp
  from lmobjective.analysis import inspection
  run = inspection.restore(workdir, step=step)
  ids = np.array([run.tokenizer.encode(w) for w in wins], np.int32)
  if ids.ndim != 2 or ids.shape[1] != WINDOW + 1:
    raise ValueError(f"{workdir}: its tokenizer does not give one token per character of the windows")
  apply = jax.jit(lambda p, x: run.model.apply({"params": p}, x))
  total = 0.0
  for i in range(0, len(ids), 256):
    x, y = ids[i:i + 256, :-1], ids[i:i + 256, 1:]
    logp = jax.nn.log_softmax(apply(run.params, x).astype(jnp.float32), axis=-1)
    total -= float(jnp.take_along_axis(logp, y[..., None], axis=-1).sum())
  return total / (len(wins) * WINDOW)


# ---- runs: each returns [(step, tokens, seconds since process start, loss)] and its tokens/s --------

def run_nanogpt(out: str, data_root: str, seed: int, wins: list[str]) -> tuple[list, float]:
  os.makedirs(out)
  shutil.copy(os.path.join(_NANOGPT.value, "configurator.py"), out)  # train.py execs it from the cwd
  os.symlink(data_root, os.path.join(out, "data"))
  cmd = [sys.executable, "-c", _NANO_WRAPPER, _NANOGPT.value, str(seed),
         os.path.join(_NANOGPT.value, "config", "train_shakespeare_char.py"), f"--device={_NANO_DEVICE.value}",
         f"--compile={_NANO_DEVICE.value != 'cpu'}", *NANOGPT_CPU, "--dataset=bench",
         f"--out_dir={out}", "--always_save_checkpoint=True", *[f"--{a}" for a in _NANO_ARGS.value]]
  t0 = time.time()
  with open(os.path.join(out, "stdout.txt"), "w") as log:
    code = subprocess.call(cmd, cwd=out, stdout=log, stderr=subprocess.STDOUT)
  if code:
    sys.exit(f"error: nanoGPT exited with {code}: see {out}/stdout.txt")
  with open(os.path.join(data_root, "bench", "meta.pkl"), "rb") as f:
    stoi = pickle.load(f)["stoi"]
  saves = [json.loads(line) for line in open(os.path.join(out, "saves.jsonl"))]
  curve = [(s["iter"], s["iter"] * 12 * WINDOW, s["time"] - t0, score_nanogpt(s["path"], wins, stoi, _NANOGPT.value))
           for s in saves]
  ms = [float(line.split("time ")[1].split("ms")[0]) for line in open(os.path.join(out, "stdout.txt"))
        if line.startswith("iter ") and "time " in line]
  return curve, 12 * WINDOW / (statistics.median(ms[5:] or ms) / 1e3)


def run_lmobjective(out: str, preset: str, text_path: str, seed: int, wins: list[str], extra: list[str],
                    cpu_devices: int) -> tuple[list, float]:
  from lmobjective.run.metrics_log import read_metrics
  cmd = [sys.executable, "-m", "lmobjective.train", f"--config={os.path.join(ROOT, 'configs', preset)}", f"--workdir={out}",
         f"--config.data.sources.text.path={text_path}", f"--config.seed={seed}",
         f"--config.data.cache_dir={os.path.join(out, 'cache')}", *[f"--config.{o}" for o in extra]]
  if cpu_devices:
    cmd.append(f"--cpu_devices={cpu_devices}")
  t0 = time.time()
  with open(out + ".stdout.txt", "w") as log:
    code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  if code:
    sys.exit(f"error: lmobjective exited with {code}: see {out}.stdout.txt")
  cfg = json.load(open(os.path.join(out, "config.json")))
  tokens_per_step = cfg["train"]["batch_size"] * cfg["data"]["context_length"]
  curve = []
  ckpts = os.path.join(out, "checkpoints")
  for step in sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()):
    meta = json.load(open(os.path.join(ckpts, str(step), "_CHECKPOINT_METADATA")))
    curve.append((step, step * tokens_per_step, meta["commit_timestamp_nsecs"] / 1e9 - t0,
                  score_lmobjective(out, step, wins)))
  speeds = [r["positions_per_sec"] for r in read_metrics(out) if "positions_per_sec" in r]
  return curve, statistics.median(speeds[1:] or speeds)


# ---- the table -----------------------------------------------------------------------------------

def reached(curve: list, target: float):
  """(seconds, tokens) of the first checkpoint with loss <= target, or None."""
  return next(((t, n) for _, n, t, loss in curve if loss <= target), None)


def summarize(name: str, runs: list, target: float) -> dict:
  hits = [reached(c, target) for c, _ in runs]
  got = [h for h in hits if h is not None]
  med = lambda xs: statistics.median(xs) if xs else None
  # a run that never reaches L* counts as infinitely slow: the median is finite only if most reach it
  times = sorted(h[0] if h else float("inf") for h in hits)
  time_med = statistics.median(times)
  return {"row": name, "runs": len(runs), "reached": len(got), "time_to_target_s": None if time_med == float("inf") else time_med,
          "tokens_to_target": med([h[1] for h in got]), "best_loss": med([min(l for *_, l in c) for c, _ in runs]),
          "tokens_per_s": med([s for _, s in runs]), "times_s": [None if h is None else h[0] for h in hits]}


def table(rows: list[dict], target: float, base: dict | None) -> str:
  out = [f"L* = {target:.4f} nats/char", "",
         "| row | runs reaching L* | time to L* (median s) | ratio to nanoGPT | tokens to L* | best val loss | tok/s | times (s) |",
         "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    t = r["time_to_target_s"]
    ratio = f"{t / base['time_to_target_s']:.2f}x" if base and t is not None and base["time_to_target_s"] else "–"
    fmt = lambda v, f: "–" if v is None else format(v, f)
    out.append(f"| {r['row']} | {r['reached']}/{r['runs']} | {fmt(t, '.1f')} | {ratio} | {fmt(r['tokens_to_target'], ',.0f')} "
               f"| {r['best_loss']:.4f} | {r['tokens_per_s']:,.0f} | {', '.join(fmt(x, '.1f') for x in r['times_s'])} |")
  return "\n".join(out) + "\n"


def main(argv) -> None:
  del argv
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO
  if "nanogpt" not in _ROWS.value and _TARGET.value is None:
    sys.exit("error: without the nanogpt row, give --target_loss (L*)")
  if "nanogpt" in _ROWS.value and not os.path.exists(os.path.join(_NANOGPT.value, "train.py")):
    sys.exit(f"error: --nanogpt_path={_NANOGPT.value}: no nanoGPT train.py there")
  work = os.path.abspath(_WORKDIR.value)
  shutil.rmtree(work, ignore_errors=True)
  os.makedirs(work)
  text = open(_TEXT.value, encoding="utf-8").read() if _TEXT.value else prose_text()
  text = text[:_MAX_CHARS.value] if _MAX_CHARS.value else text
  text_path = os.path.join(work, "text.txt")
  with open(text_path, "w", encoding="utf-8") as f:
    f.write(text)
  prepare(text, os.path.join(work, "nanogpt_data", "bench"))
  wins = windows(text)
  print(f"text: {_TEXT.value or 'the prose source (ASCII)'}, {len(text):,} characters, {len(set(text))} distinct; "
        f"evaluator: {len(wins)} windows of {WINDOW + 1}", flush=True)
  results, summary = {}, []
  seeds = range(_SEEDS.value)
  presets = {"like": ("char_fast.py:nanogpt", _OVERRIDES.value, 0), "char_fast": ("char_fast.py", _OVERRIDES.value, _CPU_DEVICES.value)}
  for name in _ROWS.value:
    runs = []
    for seed in seeds:
      out = os.path.join(work, f"{name}_{seed}")
      if name == "nanogpt":
        runs.append(run_nanogpt(out, os.path.join(work, "nanogpt_data"), seed, wins))
      else:
        preset, extra, devices = presets[name]
        runs.append(run_lmobjective(out, preset, text_path, seed, wins, extra, devices))
      curve, speed = runs[-1]
      print(f"{name} seed {seed}: " + ", ".join(f"{s}:{loss:.3f}@{t:.0f}s" for s, _, t, loss in curve)
            + f" | {speed:,.0f} tok/s", flush=True)
    results[name] = runs
  target = _TARGET.value
  if target is None:
    target = statistics.median(min(l for *_, l in c) for c, _ in results["nanogpt"])
  summary = [summarize(n, r, target) for n, r in results.items()]
  base = next((r for r in summary if r["row"] == "nanogpt"), None)
  md = table(summary, target, base)
  with open(os.path.join(work, "results.json"), "w") as f:
    json.dump({"target": target, "rows": summary, "curves": {n: [c for c, _ in r] for n, r in results.items()}}, f, indent=1)
  with open(os.path.join(work, "table.md"), "w") as f:
    f.write(md)
  print("\n" + md + f"(wrote {work}/table.md and results.json)")


if __name__ == "__main__":
  app.run(main)
