"""The objective stack as one experiment: pretrain -> SFT -> DPO and SFT -> reward model -> PPO | RLOO, then the tables.

    python experiments/objective_stack.py --workdir=runs/stack [--size=quick|full] [--jobs=N]

Each stage is the training CLI a researcher would type (printed before it runs), from the previous
stage's checkpoint (`train.init_from`), in WORKDIR/{pretrained,sft,dpo,reward_model,ppo,rloo}; a stage
whose final checkpoint exists is reused. Stages whose inputs are ready run two at a time on a CPU machine
(DPO beside the reward model, then PPO beside RLOO; `lmobjective/run/schedule.py`: their logs in
WORKDIR/logs, one XLA compilation cache in WORKDIR/xla_cache); `--jobs=1` runs them one after another. The PPO and RLOO stages sample answers to the SFT conversations'
prompts (WORKDIR/data/prompts_*.jsonl, written first), are rewarded by the reward model and watch the
gold reward (the answer's word F1 against the docstring summary). Then `analysis/stack.py` scores every
language-model stage on the same held-out sets (and the pairs by kind of negative, and the shipped
multiple-choice task: a held-out function's docstring summary among four), every policy from
SFT on on the held-out prompts (gold and proxy reward, pass@1, KL to SFT, each against SFT), the reward
model on every held-out pair, reads the RL stages' lines, and writes WORKDIR/stack.md, WORKDIR/stack.csv
and WORKDIR/stack.png.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


STAGES = (("pretrained", "pretrain", None), ("sft", "sft", "pretrained"), ("dpo", "dpo", "sft"),
          ("reward_model", "reward_model", "sft"), ("ppo", "ppo", "sft"), ("rloo", "rloo", "sft"))
LM_STAGES = ("pretrained", "sft", "dpo", "ppo", "rloo")  # scored as language models in the main table
RL_STAGES = ("ppo", "rloo")
EVAL_PROMPTS = {"quick": 96, "full": None}  # held-out prompts the RL stages' evals and the policy table answer (None: all)


def _rl_inputs(workdir: str, config_arg: str) -> list[str]:
  """An RL stage's prompts (written into WORKDIR/data: the SFT split's questions whose rendering leaves
  rl.max_new_tokens of the context for the answer) and reward model, as flags."""
  from lmobjective.config import load_config_file
  from lmobjective.data import prompts, stdlib_tasks, tokenizers
  (chat,) = load_config_file(os.path.join(ROOT, "configs", "stack.py:sft")).data.sources.values()
  c = load_config_file(os.path.join(ROOT, "configs", f"stack.py:{config_arg}"))
  tok, _ = tokenizers.load(os.path.join(workdir, "sft", "tokenizer"))
  room = c.data.context_length - c.rl.max_new_tokens
  os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
  paths, dropped = stdlib_tasks.write_prompts(os.path.join(workdir, "data"), chat.val_fraction,  # SFT's held-out modules
                                              fits=lambda m: len(prompts.render(m, tok)) <= room,
                                              eval_count=EVAL_PROMPTS["quick" if config_arg.endswith(",quick") else "full"])
  print(f"== {config_arg}: prompts longer than {room} tokens left out: {dropped['prompts_train']} train, "
        f"{dropped['prompts_heldout']} held out", flush=True)
  return [f"--config.data.sources.prompts.path={paths['prompts_train']}",
          f"--config.rl.eval_prompts={paths['prompts_eval']}",
          f"--config.rl.reward_model={os.path.join(workdir, 'reward_model')}"]


def _with_rl_inputs(argv: list[str], workdir: str, config_arg: str) -> list[str]:
  return argv + _rl_inputs(workdir, config_arg)


def stages(workdir: str, suffix: str, names: Sequence[str] = tuple(s[0] for s in STAGES)) -> list:
  """The training CLI of each stage named (printed before it runs), from its origin's checkpoint; a stage
  whose final checkpoint exists is reused."""
  from lmobjective.config import load_config_file
  from lmobjective.run import schedule
  out = []
  for name, stage, origin in STAGES:
    if name not in names:
      continue
    config = os.path.join(ROOT, "configs", "stack.py") + f":{stage}{suffix}"
    path = os.path.join(workdir, name)
    argv = ["-m", "lmobjective.train", f"--config={config}", f"--workdir={path}"]
    if origin:
      argv.append(f"--config.train.init_from={os.path.join(workdir, origin)}")
    if name in RL_STAGES:  # its prompts are written from the SFT stage's tokenizer when it starts
      argv = functools.partial(_with_rl_inputs, argv, workdir, stage + suffix)
    after = tuple(a for a in ((origin,) if origin else ()) + (("reward_model",) if name in RL_STAGES else ())
                  if a in names)
    out.append(schedule.Stage(name, argv, after, schedule.trained(path, load_config_file(config))))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/stack", help="where the stages and the tables go")
  parser.add_argument("--size", choices=("quick", "full"), default="quick", help="quick: the CPU setting")
  from lmobjective.run import schedule
  schedule.add_jobs_flag(parser)
  args = parser.parse_args()
  workdir = os.path.abspath(args.workdir)
  os.environ.update(schedule.cache_env(workdir))  # the tables' programs too (before JAX is imported)
  suffix = ",quick" if args.size == "quick" else ""
  t0 = time.time()
  schedule.run(stages(workdir, suffix), workdir, args.jobs)
  from lmobjective.analysis import stack
  workdirs = {name: os.path.join(workdir, name) for name in LM_STAGES}
  table, kinds = stack.rows(workdirs), stack.kind_rows(workdirs)
  policies = stack.policy_rows(stack.policy_scores(workdirs["rloo"], {k: workdirs[k] for k in LM_STAGES[1:]},
                                                   os.path.join(workdir, "probe_policies")))
  rlhf = (stack.rlhf_markdown(stack.reward_model_row(os.path.join(workdir, "reward_model")),
                              [stack.rl_row(workdirs[k]) for k in RL_STAGES])
          + "\nevery policy on the held-out prompts (gold: summary F1; proxy: the reward model; KL to SFT, nats):\n"
          + stack.policy_markdown(policies))
  md, csv_path = stack.save(table, workdir, kinds, rlhf)
  png = stack.save_curves({k: workdirs[k] for k in ("pretrained", "sft", "dpo")}, workdir)
  print(stack.markdown(table) + stack.comparison_markdown(stack.comparisons(table))
        + ("\nheld-out preference accuracy by kind of negative:\n" + stack.kind_markdown(kinds)
                                 if kinds else "") + "\nthe RLHF branch (SFT -> reward model -> PPO | RLOO):\n" + rlhf, end="")
  print(f"wrote {md}, {csv_path}, {png} ({time.time() - t0:.0f} s in all)")

if __name__ == "__main__":
  main()
