"""RL on a verifiable task, end to end: pretrain -> SFT -> RLOO on multi-digit addition, then held-out
pass@1 before and after RL with exact paired tests.

    python experiments/rl_addition.py --workdir=runs/rl_addition

Writes the task (`data/arithmetic.py`, sizes `configs/addition.py:TASK`) into WORKDIR/data, then runs
each stage as the training CLI a researcher would type (printed before it runs) in
WORKDIR/{pretrained,sft,rl}, each from the one before (`train.init_from`); a stage whose final
checkpoint exists is reused. Then it scores the SFT model (the RL stage's start and reference) and
the final RL model on the same held-out prompts with the RL stage's own sampler and reward
(`rollout.eval_rewards`): greedy pass@1 and sampled pass@1 (the mean over rl.eval_samples samples
per prompt, the same random stream for both models).

Tests, all exact and two-sided, on the same prompts: greedy, McNemar (binomial on the discordant
prompts: b solved only after RL, c only before); sampled, McNemar on each prompt's first draw (one
pair per prompt, the two models on the same random stream) and a sign test on the per-prompt mean
reward (b prompts whose mean rose, c whose mean fell, ties left out), the same binomial. The table
goes to stdout and WORKDIR/rl_addition.md; the exit status is 1 (one line) unless RL raised held-out
sampled pass@1 (one draw per prompt) with McNemar p < 0.05.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = os.path.join(ROOT, "configs", "addition.py")
# The exit status: RL must raise held-out sampled pass@1 (the expected reward it maximises; one draw per
# prompt, exact McNemar) at this two-sided level. Greedy pass@1 is printed with its own p but not
# required: from a model that already answers 0.92 greedily it has no room (docs/objectives.md).
ALPHA = 0.05
STAGES = (("pretrained", "pretrain", None), ("sft", "sft", "pretrained"), ("rl", "rl", "sft"))


def exact_p(b: int, c: int) -> float:
  """Two-sided exact binomial p of b successes against c under p = 1/2 (McNemar's exact test on the
  discordant pairs, or a sign test): P(as far from (b+c)/2 as min(b, c)); 1 when b + c = 0."""
  n, k = b + c, min(b, c)
  return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n) if n else 1.0


def _config_module():
  import importlib.util
  spec = importlib.util.spec_from_file_location("lmobjective_config_addition", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def stage_flags(workdir: str, stage: str, origin: str | None, seed: int = 0) -> dict[str, str | int]:
  """The dotted config overrides of `stage`: the data files under WORKDIR/data and the origin."""
  data = os.path.join(workdir, "data")
  files = {"pretrain": {"chats": "sft.jsonl"}, "sft": {"chat": "sft.jsonl"},
           "rl": {"prompts": "prompts_train.jsonl"}}[stage]
  flags = {f"data.sources.{name}.path": os.path.join(data, f) for name, f in files.items()}
  if stage == "rl":
    flags["rl.eval_prompts"] = os.path.join(data, "prompts_heldout.jsonl")
  if origin:
    flags["train.init_from"] = os.path.join(workdir, origin)
  if seed:
    flags["seed"] = seed
  return flags


def load_stage_config(stage: str, flags: dict[str, str | int]):
  """configs/addition.py:`stage` with `flags` applied, as the CLI applies them."""
  from lmobjective.config import load_config_file, set_dotted
  c = load_config_file(f"{CONFIG}:{stage}")
  for key, value in flags.items():
    set_dotted(c, key, value)
  return c


def stages(workdir: str, seed: int = 0) -> list:
  """Each stage's training CLI (printed before it runs), one after another; a stage whose final checkpoint
  exists is reused."""
  from lmobjective.run import schedule
  out = []
  for name, stage, origin in STAGES:
    path, flags = os.path.join(workdir, name), stage_flags(workdir, stage, origin, seed)
    argv = ["-m", "lmobjective.train", f"--config={CONFIG}:{stage}", f"--workdir={path}",
            *(f"--config.{k}={v}" for k, v in flags.items())]
    out.append(schedule.Stage(name, argv, (origin,) if origin else (), schedule.trained(path, load_stage_config(stage, flags))))
  return out


def score(workdir: str, seed: int = 0) -> dict:
  """Held-out rewards of the SFT params (the RL stage's init) and the final RL params, per prompt."""
  import jax
  import numpy as np
  from lmobjective import sharding
  from lmobjective.run import checkpoint, rollout
  rl_dir = os.path.join(workdir, "rl")
  rlx = rollout.build(load_stage_config("rl", stage_flags(workdir, "rl", "sft", seed)), rl_dir)
  key = jax.random.key(rlx.config.seed)
  before = rlx.ms.init_fn(key).params  # train.init_from's params: the SFT model
  abstract = sharding.abstract_state(rlx.ms.init_fn.eval_shape(key), rlx.ms.state_sharding).params
  _, after, _, _ = checkpoint.restore_params(rl_dir, None, abstract)
  k = rlx.config.rl.eval_samples
  out = {"prompts": len(rlx.eval_prompts), "samples": k}
  for name, params in (("before", before), ("after", after)):
    out[f"greedy_{name}"] = rollout.eval_rewards(rlx, params, rlx.eval_prompts, greedy=True)[:, 0] > 0.5
    drawn = rollout.eval_rewards(rlx, params, rlx.eval_prompts, greedy=False, samples_per_prompt=k)
    out[f"first_{name}"] = drawn[:, 0] > 0.5  # one sampled response per prompt: a McNemar pair per prompt
    out[f"sampled_{name}"] = drawn.mean(axis=1)
  for test, (x, y) in {"greedy": ("greedy_after", "greedy_before"), "first": ("first_after", "first_before")}.items():
    out[f"{test}_b"] = int(np.sum(out[x] & ~out[y]))
    out[f"{test}_c"] = int(np.sum(out[y] & ~out[x]))
  out["sampled_b"] = int(np.sum(out["sampled_after"] > out["sampled_before"]))
  out["sampled_c"] = int(np.sum(out["sampled_after"] < out["sampled_before"]))
  return out


def markdown(s: dict) -> str:
  g_p, f_p, s_p = (exact_p(s[f"{t}_b"], s[f"{t}_c"]) for t in ("greedy", "first", "sampled"))
  return (f"held-out pass@1 on {s['prompts']} prompts (exact_answer reward):\n\n"
          f"| model | greedy pass@1 | sampled pass@1 (mean of {s['samples']}) |\n|---|---|---|\n"
          f"| SFT (before RL) | {s['greedy_before'].mean():.3f} | {s['sampled_before'].mean():.3f} |\n"
          f"| RLOO (after RL) | {s['greedy_after'].mean():.3f} | {s['sampled_after'].mean():.3f} |\n\n"
          f"- greedy: exact McNemar, b = {s['greedy_b']} prompts solved only after RL, c = {s['greedy_c']} only "
          f"before, two-sided p = {g_p:.3g}\n"
          f"- sampled, one response per prompt (its first draw, the same random stream for both models): exact "
          f"McNemar, b = {s['first_b']}, c = {s['first_c']}, two-sided p = {f_p:.3g}\n"
          f"- sampled: exact sign test on the per-prompt mean reward, b = {s['sampled_b']} prompts up, "
          f"c = {s['sampled_c']} down ({s['prompts'] - s['sampled_b'] - s['sampled_c']} tied), two-sided p = {s_p:.3g}\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/rl_addition", help="where the data, the stages and the table go")
  parser.add_argument("--seed", type=int, default=0, help="every stage's `seed` (init, data order, samples); the task stays")
  args = parser.parse_args()
  workdir = os.path.abspath(args.workdir)
  t0 = time.time()
  from lmobjective.data import arithmetic
  task = _config_module().TASK
  paths = arithmetic.write_task(os.path.join(workdir, "data"), **task)
  print(f"== data: {task} -> {os.path.dirname(paths['pretrain'])}", flush=True)
  from lmobjective.run import schedule
  schedule.run(stages(workdir, args.seed), workdir, jobs=1)  # each stage needs the one before
  s = score(workdir, args.seed)
  md = markdown(s)
  with open(os.path.join(workdir, "rl_addition.md"), "w") as f:
    f.write(md)
  print(md + f"wrote {os.path.join(workdir, 'rl_addition.md')} ({time.time() - t0:.0f} s in all)")
  p = exact_p(s["first_b"], s["first_c"])
  if not (s["first_b"] > s["first_c"] and p < ALPHA):
    sys.exit(f"error: RL did not raise held-out sampled pass@1 ({s['first_before'].mean():.3f} -> "
             f"{s['first_after'].mean():.3f} on one draw per prompt, McNemar p = {p:.3g}, needs < {ALPHA})")


if __name__ == "__main__":
  main()
