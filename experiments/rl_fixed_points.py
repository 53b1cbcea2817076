"""The sampled tier: the RL loop reaches each objective's fixed point on the bandit, within τ.

    python experiments/rl_fixed_points.py --workdir=runs/rl_fixed_points [--seeds=5]

A tiny model pretrained on "x" + a candidate (`data/bandit.py`) is the reference; the real loop
(`train.run`, objective.kind rloo | grpo | ppo) samples one token per response from it, the learning rate
decaying linearly to 0. After the run, the policy's next-token distribution after the prompt is
compared with the exact fixed points over the whole vocabulary (`analysis/fixed_points.py`):

  rloo, k1 in the reward                     -> π* ∝ π_ref·exp(r/β)
  grpo, scale_rewards none, k3 in the loss  -> π = β′·π_ref/(λ − r), β′ = β·G/(G−1)
  rloo, epochs = num_minibatches = 2        -> π* (clipping moves no fixed point)
  ppo, k1 in the reward per token, a value head on the policy as the baseline -> π*

For each run: KL(target ‖ π) over `--seeds` seeds (the noise floor is their max), the nearest wrong
fixed point's KL from the target, and τ = that distance / 5. `tests/test_rl_fixed_points.py` runs
seed 0 of each and asserts KL < τ. Prints one table (markdown).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BETA, G = 0.5, 4
RUNS = {  # name: (objective.kind, the target fixed point, the keys beside the common ones)
    "rloo": ("rloo", "pi*", {"train.steps": 150, "train.batch_size": 8, "optimizer.learning_rate": 3e-3}),
    "grpo_k3": ("grpo", "fwd(b')", {"train.steps": 300, "train.batch_size": 16, "optimizer.learning_rate": 2e-3,
                                    "rl.scale_rewards": "none", "rl.kl_placement": "loss", "rl.kl_estimator": "k3"}),
    "rloo_2x2": ("rloo", "pi*", {"train.steps": 150, "train.batch_size": 8, "optimizer.learning_rate": 3e-3,
                                 "rl.epochs": 2, "rl.num_minibatches": 2}),
    "ppo": ("ppo", "pi*", {"train.steps": 150, "train.batch_size": 8, "optimizer.learning_rate": 3e-3}),
}


def _config(name: str, seed: int, cache: str, paths: dict, origin: str):
  from lmobjective import config as config_lib
  from lmobjective.data import bandit
  c = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
  c.data.cache_dir, c.data.tokenizer.kind, c.seed = cache, "byte", seed
  source = c.data.sources.code
  source.kind, source.path, source.val_fraction, source.max_documents = "prompts_jsonl", paths["prompts"], 0.0, None
  c.data.sources = {"prompts": source}
  kind, _, keys = RUNS[name]
  settings = {"objective.kind": kind, "objective.beta": BETA, "train.init_from": origin, "rl.max_new_tokens": 1,
              "rl.num_generations": G, "rl.reward_fn": bandit.REWARD_FN, "optimizer.schedule": "linear",
              "optimizer.end_learning_rate": 0.0, "optimizer.warmup_steps": 0, "optimizer.weight_decay": 0.0,
              "checkpoint.every_steps": 0, "eval.num_batches": 0, "train.log_every_steps": 50, **keys}
  for key, value in settings.items():
    config_lib.set_dotted(c, key, value)
  return c


def origin(workdir: str) -> tuple[str, dict, str]:
  """(cache, paths, origin workdir): the bandit's files and its pretrained reference (reused when done)."""
  from lmobjective import config as config_lib
  from lmobjective.data import bandit
  from lmobjective.run import checkpoint, train
  os.makedirs(workdir, exist_ok=True)
  paths, cache, out = bandit.write(workdir), os.path.join(workdir, "cache"), os.path.join(workdir, "origin")
  c = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
  c.data.cache_dir, c.data.tokenizer.kind = cache, "byte"
  c.data.sources.code.kind, c.data.sources.code.path, c.data.sources.code.max_documents = "text", paths["text"], None
  c.data.sources = {"text": c.data.sources.code}
  c.train.steps, c.eval.num_batches, c.checkpoint.every_steps = 60, 0, 0
  if 60 not in checkpoint.finalized_steps(out):
    train.run(c, out)
  return cache, paths, out


def fixed_points(logp_ref_V, r_V) -> dict:
  from lmobjective.analysis import fixed_points as fp
  b2 = BETA * G / (G - 1)
  return {"pi*": fp.reverse_kl_optimum(logp_ref_V, r_V, BETA), "pi*(b')": fp.reverse_kl_optimum(logp_ref_V, r_V, b2),
          "fwd(b)": fp.forward_kl_point(logp_ref_V, r_V, BETA), "fwd(b')": fp.forward_kl_point(logp_ref_V, r_V, b2)}


def run(name: str, seed: int, workdir: str) -> dict:
  """One run of `name`; {kl: KL(target‖π), wrong: the nearest wrong point's KL from the target, ...}."""
  import numpy as np

  from lmobjective.analysis import fixed_points as fp
  from lmobjective.data import bandit
  from lmobjective.run import checkpoint, rollout, train
  cache, paths, origin_dir = origin(workdir)
  config = _config(name, seed, cache, paths, origin_dir)
  out = os.path.join(workdir, f"{name}_seed{seed}")
  t = time.time()
  if config.train.steps * (config.rl.epochs * config.rl.num_minibatches) not in checkpoint.finalized_steps(out):
    train.run(config, out)
  seconds = time.time() - t
  rlx = rollout.build(config, os.path.join(workdir, "probe"))
  mngr = checkpoint.make_manager(out, read_only=True)
  try:
    params = mngr.restore(max(mngr.all_steps()))["state"]["params"]
  finally:
    checkpoint.close(mngr)
  ids = [rlx.tokenizer.eos_id] + rlx.tokenizer.encode(bandit.PROMPT)
  cfg = rollout.sampling_config(rlx, bandit.PROMPT)
  logp = lambda p: np.asarray(rlx.sampler.next_logps(p, [ids], cfg), np.float64)[0]
  logp_ref, logp_pi = logp(rlx.ms.reference), logp(params)
  points = fixed_points(logp_ref, bandit.reward_table(len(logp_ref), rlx.tokenizer))
  target = RUNS[name][1]
  wrong = {k: fp.kl(points[target], v) for k, v in points.items() if k != target}
  nearest = min(wrong, key=wrong.get)
  return {"name": name, "seed": seed, "target": target, "kl": fp.kl(points[target], logp_pi),
          "nearest_wrong": nearest, "wrong_kl": wrong[nearest], "ref_kl": fp.kl(points[target], logp_ref),
          "seconds": seconds}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/rl_fixed_points")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--runs", default=",".join(RUNS))
  args = parser.parse_args()
  rows = []
  for name in args.runs.split(","):
    results = [run(name, s, args.workdir) for s in range(args.seeds)]
    kls = [r["kl"] for r in results]
    r0 = results[0]
    tau = r0["wrong_kl"] / 5
    rows.append(f"| {name} | {r0['target']} | {r0['ref_kl']:.4f} | " + ", ".join(f"{k:.1e}" for k in kls)
                + f" | {max(kls):.1e} | {r0['nearest_wrong']} {r0['wrong_kl']:.4f} | {tau:.1e} | "
                f"{'yes' if max(kls) < tau else 'NO'} | {sum(r['seconds'] for r in results) / len(results):.0f} s |")
  print("| run | target | KL(target‖π_ref) | KL(target‖π) per seed | noise floor (max) | nearest wrong point, "
        "KL from target | τ = that / 5 | max < τ | s/run |")
  print("|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  main()
