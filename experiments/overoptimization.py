"""Reward over-optimisation as an experiment (Gao et al. 2022): gold and proxy reward against √KL(π‖π_ref).

    python experiments/overoptimization.py --workdir=runs/overopt [--size=quick|full] [--sft=runs/stack/sft] [--jobs=N]

1. The SFT model of the objective stack (`--sft`, or the stack's pretrain and SFT stages run into
   WORKDIR/stack) samples two answers to each of N train questions of the docstring task; the gold reward
   (`rewards.summary_f1`, word F1 against the docstring summary) labels each pair by Bradley–Terry,
   P(a ≻ b) = σ((g_a − g_b)/τ); WORKDIR/data/pairs_{small,large}.jsonl hold the first eighth and all of them.
2. Two proxy reward models (`configs/overoptimization.py:proxy`) are fitted to them from the SFT model.
3. PPO and RLOO against the large proxy (quick: at β 0.02; full: 0.01, 0.03, 0.1), and the runs that
   optimise hard (β 0.001, learning rate 3e-4: PPO against the small proxy; full: the large one too),
   watching the gold reward (weight 0): every eval line has the held-out proxy and gold rewards and
   val_kl_full_sampled (the full-distribution KL of the sampled responses).
4. Best-of-n, the baseline without training: M reference samples per held-out question scored by the large
   proxy and by gold; for n = 1, 2, 4, … up to M/4 the exact KL (`analysis/overoptimization.py`) and the kept response's rewards.
5. The curves (gold and proxy, each minus its value at the reference, against d = √KL) in
   WORKDIR/overoptimization.png, Gao et al.'s forms fitted (d(α − β log d) for RL, d(α − β d) for best-of-n)
   with their coefficients in WORKDIR/overoptimization.md, and each RL run's reward_hacking finding.
Held-out questions only (the stack's held-out modules). Finished stages are reused. Stages whose inputs are
ready run two at a time on a CPU machine (the two proxies; then the RL runs and best-of-n;
`lmobjective/run/schedule.py`: their logs in WORKDIR/logs, one XLA compilation cache in WORKDIR/xla_cache).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HARD = 3e-4  # the learning rate of the runs that optimise hard (the stages' own is 1e-4; 1e-3 until 2026-12-07: docs/objectives.md)
SIZES = {  # train questions labelled; held-out questions the RL evals and best-of-n score; best-of-n samples each;
    #        the RL runs (kind, proxy, β, learning rate)
    "quick": {"pairs": 1200, "eval_prompts": 96, "bon_samples": 64,
              "runs": (("ppo", "large", 0.02, 1e-4), ("rloo", "large", 0.02, 1e-4), ("ppo", "small", 0.001, HARD))},
    "full": {"pairs": 3600, "eval_prompts": 405, "bon_samples": 256,
             "runs": tuple((k, "large", b, 1e-4) for b in (0.01, 0.03, 0.1) for k in ("ppo", "rloo"))
             + (("ppo", "large", 0.001, HARD), ("ppo", "small", 0.001, HARD))},
}
SMALL = 8  # the small proxy is fitted to the first 1/SMALL of the pairs (a quarter until 2026-12-07: docs/objectives.md)
TAU = 0.1  # Bradley–Terry temperature of the gold labels (F1 differences are in [-1, 1])
NS = (1, 2, 4, 8, 16, 32, 64)  # best-of-n's n, those with at least 4n reference samples per question (m >> n)
BON_CHUNK = 8  # held-out questions sampled together for best-of-n
CONFIG = os.path.join(ROOT, "configs", "overoptimization.py")
BON_FILE = "best_of_n.json"


def _stage(name: str, workdir: str, config_arg: str, after: tuple[str, ...], *flags: str):
  """`python -m lmobjective.train` for one stage, reused when its final checkpoint exists."""
  from lmobjective.config import load_config_file
  from lmobjective.run import schedule
  path = os.path.join(workdir, name)
  argv = ["-m", "lmobjective.train", f"--config={CONFIG}:{config_arg}", f"--workdir={path}", *flags]
  return schedule.Stage(name, argv, after, schedule.trained(path, load_config_file(f"{CONFIG}:{config_arg}")))


def sft_origin(workdir: str, sft: str | None, suffix: str, jobs: int | None) -> str:
  if sft:
    return os.path.abspath(sft)
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import objective_stack
  from lmobjective.run import schedule
  stack = os.path.join(workdir, "stack")
  schedule.run(objective_stack.stages(stack, suffix, ("pretrained", "sft")), workdir, jobs)
  return os.path.join(stack, "sft")


def write_prompts(workdir: str, sft: str, max_new_tokens: int, context_length: int, n_eval: int) -> dict[str, str]:
  """The stack's train and held-out questions that leave max_new_tokens of the context for the answer; n_eval
  held-out ones evenly spaced (WORKDIR/data/prompts_eval.jsonl) are what the RL evals and best-of-n score."""
  from lmobjective.config import load_config_file
  from lmobjective.data import prompts, stdlib_tasks, tokenizers
  (chat,) = load_config_file(os.path.join(ROOT, "configs", "stack.py:sft")).data.sources.values()
  tok, _ = tokenizers.load(os.path.join(sft, "tokenizer"))
  room = context_length - max_new_tokens
  paths, dropped = stdlib_tasks.write_prompts(os.path.join(workdir, "data"), chat.val_fraction,
                                              fits=lambda m: len(prompts.render(m, tok)) <= room, eval_count=n_eval)
  print(f"== prompts longer than {room} tokens left out: {dropped['prompts_train']} train, "
        f"{dropped['prompts_heldout']} held out", flush=True)
  return paths


def label_pairs(workdir: str, sft: str, prompts_path: str, n_pairs: int, max_new_tokens: int) -> dict[str, str]:
  """Two SFT samples per train question, gold-labelled by Bradley–Terry: pairs_small.jsonl (an eighth) and
  pairs_large.jsonl (all); identical answers are left out. Reused when both files exist."""
  from lmobjective import files, rewards
  from lmobjective.analysis import inspection, overoptimization
  from lmobjective.data import prompts as prompts_lib
  out = {s: os.path.join(workdir, "data", f"pairs_{s}.jsonl") for s in ("small", "large")}
  if all(os.path.exists(p) for p in out.values()):
    return out
  t0 = time.time()
  run = inspection.restore(sft)
  ps = prompts_lib.load_prompts("prompts", prompts_path)
  idx = list(range(min(n_pairs, len(ps))))
  asked, fields = ps.take([i for i in idx for _ in range(2)])
  answers = []
  for first in range(0, len(asked), 64):
    s = run.sample(asked[first:first + 64], max_new_tokens=max_new_tokens, temperature=1.0, seed=first)
    for toks, mask in zip(s.tokens, s.response_mask):
      ids = [int(t) for t in toks[mask]]
      answers.append(run.tokenizer.decode(ids[:-1] if ids and ids[-1] in run.stop_ids(asked[0]) else ids))
  gold = rewards.summary_f1(asked, answers, fields["summary"])
  a_wins = overoptimization.bradley_terry_labels(gold[0::2], gold[1::2], TAU, seed=0)
  pairs = []
  for i, wins in enumerate(a_wins):
    a, b = answers[2 * i], answers[2 * i + 1]
    if a.strip() and b.strip() and a != b:
      pairs.append({"prompt": asked[2 * i], "chosen": a if wins else b, "rejected": b if wins else a})
  files.atomic_write(out["large"], "".join(json.dumps(p) + "\n" for p in pairs))
  files.atomic_write(out["small"], "".join(json.dumps(p) + "\n" for p in pairs[:len(pairs) // SMALL]))
  print(f"== pairs: {len(pairs)} gold-labelled pairs from {len(idx)} questions (mean gold F1 of the samples "
        f"{sum(gold) / len(gold):.3f}) in {time.time() - t0:.0f} s", flush=True)
  return out


def rl_runs(size: dict) -> list[tuple[str, str, str, float, float]]:
  """(name, kind, proxy, β, learning rate) of every RL run."""
  return [(f"{kind}_{proxy}_b{beta:g}" + (f"_lr{lr:g}" if lr != 1e-4 else ""), kind, proxy, beta, lr)
          for kind, proxy, beta, lr in size["runs"]]


def best_of_n(workdir: str, config_arg: str, sft: str, proxy: str, paths: dict, size: dict) -> list[dict]:
  """Best-of-n curve on the eval questions, each with bon_samples SFT samples scored by
  the proxy (its ids, as RL scores them) and by gold; cached in WORKDIR/best_of_n.json."""
  import numpy as np

  from lmobjective import config as config_lib, files
  from lmobjective.analysis import overoptimization
  from lmobjective.data import prompts as prompts_lib
  from lmobjective.run import rollout
  cache = os.path.join(workdir, BON_FILE)
  ns = [n for n in NS if 4 * n <= size["bon_samples"]]
  if os.path.exists(cache):
    return [p for p in json.load(open(cache)) if p["n"] in ns]
  c = config_lib.load_config_file(f"{CONFIG}:{config_arg}")
  for key, value in (("train.init_from", sft), ("rl.reward_model", proxy), ("data.sources.prompts.path", paths["prompts_train"]),
                     ("rl.eval_prompts", paths["prompts_eval"])):
    config_lib.set_dotted(c, key, value)
  rlx = rollout.build(c, os.path.join(workdir, "probe_best_of_n"))
  held = prompts_lib.load_prompts("prompts", paths["prompts_eval"])
  proxy, gold = [], []
  for first in range(0, len(held), BON_CHUNK):  # BON_CHUNK x bon_samples rows at a time
    chunk = held.subset(range(first, min(first + BON_CHUNK, len(held))))
    s = rollout.eval_scores(rlx, rlx.ms.reference, chunk, greedy=False, samples_per_prompt=size["bon_samples"],
                            stream=rollout.EVAL_STREAM - 1 - first)  # not an RL eval's samples
    proxy.append(s.per_term["reward_model"])
    gold.append(s.per_term["summary_f1"])
  curve = overoptimization.best_of_n_curve(np.concatenate(proxy), np.concatenate(gold), ns)
  files.atomic_write(cache, json.dumps(curve))
  return curve


def rl_curve(run_dir: str) -> list[dict]:
  from lmobjective.run.metrics_log import read_metrics
  return [{"step": r["step"], "kl": r["val_kl_full_sampled"], "d": max(r["val_kl_full_sampled"], 0.0) ** 0.5,
           "proxy": r["val_reward_sampled"], "gold": r["val_watched/summary_f1/sampled"]}
          for r in read_metrics(run_dir) if "val_kl_full_sampled" in r]


def report(workdir: str, curves: dict[str, list[dict]]) -> str:
  """The fits (gold and proxy minus their values at the reference) and each run's end point, markdown."""
  from lmobjective.analysis import diagnose, overoptimization
  lines = ["| run | form | gold α | gold β | gold fit RMS | proxy α | proxy β | end √KL | end gold − ref | end proxy − ref | reward_hacking |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, curve in curves.items():
    form = "best_of_n" if name == "best_of_n" else "rl"
    d = [p["d"] for p in curve]
    g0, p0 = curve[0]["gold"], curve[0]["proxy"]
    fit = lambda key, base: overoptimization.fit_gao(d, [p[key] - base for p in curve], form)
    g, pr = fit("gold", g0), fit("proxy", p0)
    hack = "–" if name == "best_of_n" else ", ".join(
        f"steps {f['start_step']}-{f['end_step']}" for f in (diagnose.load(os.path.join(workdir, name)) or [])
        if f["kind"] == "reward_hacking") or "none"
    lines.append(f"| {name} | {form} | {g['alpha']:.4f} | {g['beta']:.4f} | {g['rms']:.4f} | {pr['alpha']:.4f} | "
                 f"{pr['beta']:.4f} | {d[-1]:.3f} | {curve[-1]['gold'] - g0:+.4f} | {curve[-1]['proxy'] - p0:+.4f} | {hack} |")
  return "\n".join(lines) + "\n"


def plot(workdir: str, curves: dict[str, list[dict]]) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from lmobjective import files
  from lmobjective.analysis import overoptimization
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, curve in curves.items():
    d = [p["d"] for p in curve]
    form = "best_of_n" if name == "best_of_n" else "rl"
    for ax, key in zip(axes, ("gold", "proxy")):
      y = [p[key] - curve[0][key] for p in curve]
      line, = ax.plot(d, y, "o" if form == "rl" else "s", ms=3, label=name)
      fit = overoptimization.fit_gao(d, y, form)
      grid = [max(d) * i / 50 for i in range(1, 51)]
      ax.plot(grid, overoptimization.gao_curve(grid, fit["alpha"], fit["beta"], form), "-", lw=1, color=line.get_color())
  for ax, key in zip(axes, ("gold (summary F1)", "proxy (reward model)")):
    ax.set(xlabel="√KL(π ‖ π_ref)  (nats^½)", ylabel=f"{key} − at the reference", title=key)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(workdir, "overoptimization.png")
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110)
  plt.close(fig)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/overopt")
  parser.add_argument("--size", choices=tuple(SIZES), default="quick", help="quick: the CPU setting")
  parser.add_argument("--sft", default=None, help="a finished SFT run of the stack (configs/stack.py:sft) to start from")
  from lmobjective.run import schedule
  schedule.add_jobs_flag(parser)
  parser.add_argument("--best_of_n_only", action="store_true",
                      help="only the best-of-n samples (WORKDIR/best_of_n.json): the stage the driver runs beside the RL runs")
  args = parser.parse_args()
  workdir, size, suffix = os.path.abspath(args.workdir), SIZES[args.size], ",quick" if args.size == "quick" else ""
  t0 = time.time()
  os.environ.update(schedule.cache_env(workdir))  # the driver's own programs too (before JAX is imported)
  from lmobjective.config import load_config_file
  rl_cfg = load_config_file(f"{CONFIG}:ppo{suffix}")
  sft = sft_origin(workdir, args.sft, suffix, args.jobs)
  os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
  paths = write_prompts(workdir, sft, rl_cfg.rl.max_new_tokens, rl_cfg.data.context_length, size["eval_prompts"])
  proxy_large = os.path.join(workdir, "proxy_large")
  if args.best_of_n_only:
    best_of_n(workdir, "ppo" + suffix, sft, proxy_large, paths, size)
    return
  pairs = label_pairs(workdir, sft, paths["prompts_train"], size["pairs"], rl_cfg.rl.max_new_tokens)
  stages = [_stage(f"proxy_{which}", workdir, "proxy" + suffix, (), f"--config.train.init_from={sft}",
                   f"--config.data.sources.pairs.path={pairs[which]}") for which in ("small", "large")]
  for name, kind, which, beta, lr in rl_runs(size):
    stages.append(_stage(name, workdir, kind + suffix, (f"proxy_{which}",), f"--config.train.init_from={sft}",
                         f"--config.rl.reward_model={os.path.join(workdir, 'proxy_' + which)}",
                         f"--config.objective.beta={beta}", f"--config.optimizer.learning_rate={lr}",
                         f"--config.data.sources.prompts.path={paths['prompts_train']}",
                         f"--config.rl.eval_prompts={paths['prompts_eval']}"))
  stages.append(schedule.Stage("best_of_n", [os.path.abspath(__file__), f"--workdir={workdir}", f"--size={args.size}",
                                             f"--sft={sft}", "--best_of_n_only"], ("proxy_large",),
                               os.path.exists(os.path.join(workdir, BON_FILE))))
  schedule.run(stages, workdir, args.jobs)
  curves = {"best_of_n": best_of_n(workdir, "ppo" + suffix, sft, proxy_large, paths, size)}
  curves.update({name: rl_curve(os.path.join(workdir, name)) for name, *_ in rl_runs(size)})
  table = report(workdir, curves)
  from lmobjective import files
  files.atomic_write(os.path.join(workdir, "overoptimization.md"), table)
  png = plot(workdir, curves)
  print(table, end="")
  print(f"wrote {os.path.join(workdir, 'overoptimization.md')}, {png} ({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
  main()
