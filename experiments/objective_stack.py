"""The objective stack as one experiment: pretrain -> SFT -> DPO, then one table of what each changed.

    python experiments/objective_stack.py --workdir=runs/stack [--size=quick|full]

Each stage is the training CLI a researcher would type (printed before it runs), from the previous
stage's checkpoint (`train.init_from`), in WORKDIR/{pretrained,sft,dpo}; a stage whose final
checkpoint exists is reused. Then `analysis/stack.py` scores every stage's model on the same
held-out sets (and the pairs by kind of negative) and writes WORKDIR/stack.md, WORKDIR/stack.csv and WORKDIR/stack.png.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import argparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


STAGES = (("pretrained", "pretrain", None), ("sft", "sft", "pretrained"), ("dpo", "dpo", "sft"))


def _finished(workdir: str, config_arg: str) -> bool:
  from lmobjective.config import load_config_file
  from lmobjective.run import checkpoint
  steps = load_config_file(os.path.join(ROOT, "configs", f"stack.py:{config_arg}")).train.steps
  return os.path.isdir(workdir) and steps in checkpoint.finalized_steps(workdir)


def run_stage(workdir: str, name: str, config_arg: str, origin: str | None) -> None:
  path = os.path.join(workdir, name)
  if _finished(path, config_arg):
    print(f"== {name}: reusing the finished stage in {path}", flush=True)
    return
  cmd = [sys.executable, "-m", "lmobjective.train", f"--config={os.path.join(ROOT, 'configs', 'stack.py')}:{config_arg}",
         f"--workdir={path}"]
  if origin:
    cmd.append(f"--config.train.init_from={os.path.join(workdir, origin)}")
  print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
  t0 = time.time()
  code = subprocess.call(cmd, cwd=ROOT)
  if code:
    sys.exit(f"error: stage {name} exited with status {code}")
  print(f"== {name}: done in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/stack", help="where the three stages and the table go")
  parser.add_argument("--size", choices=("quick", "full"), default="quick", help="quick: the CPU setting")
  args = parser.parse_args()
  workdir = os.path.abspath(args.workdir)
  suffix = ",quick" if args.size == "quick" else ""
  t0 = time.time()
  for name, stage, origin in STAGES:
    run_stage(workdir, name, stage + suffix, origin)
  from lmobjective.analysis import stack
  workdirs = {name: os.path.join(workdir, name) for name, _, _ in STAGES}
  table, kinds = stack.rows(workdirs), stack.kind_rows(workdirs)
  md, csv_path = stack.save(table, workdir, kinds)
  png = stack.save_curves(workdirs, workdir)
  print(stack.markdown(table) + stack.comparison_markdown(stack.comparisons(table))
        + ("\nheld-out preference accuracy by kind of negative:\n" + stack.kind_markdown(kinds)
                                 if kinds else ""), end="")
  print(f"wrote {md}, {csv_path}, {png} ({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
  main()
