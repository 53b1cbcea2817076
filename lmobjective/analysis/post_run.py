"""What the training CLI does after the last checkpoint: steps `fn(exp, params, workdir, is_lead)`.

`train.run(config, workdir, post_run=STEPS)` runs them in order on every process (loss by
position is a collective evaluation; the others only write on the lead process). The library
entry point runs none by default, so training depends on none of this analysis code.
"""

from __future__ import annotations

import functools
import os

from lmobjective.analysis import diagnose, plotting, position_loss
from lmobjective.objectives import Objective, preference, reward_model
from lmobjective.run import metrics_log


def loss_by_position(exp, params, workdir: str, lead: bool) -> None:
  """val_loss_by_position.json (computed on every process, written by the lead one); objectives whose
  loss is per token only."""
  if not exp.objective.per_token:
    return
  position_loss.save(exp, params, workdir, write=lead)


def loss_curves_and_table(exp, params, workdir: str, lead: bool) -> None:
  """loss_curves.png and the printed step / train / val table."""
  if lead:
    records = metrics_log.read_metrics(workdir)
    plotting.save_loss_curves(records, workdir, exp.objective, title=os.path.basename(os.path.abspath(workdir)))
    print_loss_table(exp.objective, records)


def diagnostics(exp, params, workdir: str, lead: bool) -> None:
  """diagnostics.json and the printed findings."""
  if lead:
    diagnose.diagnose_run(workdir)


diagnostics.applies_to_rl = True  # reads only metrics.jsonl: the RL loop runs it too

STEPS = (loss_by_position, loss_curves_and_table, diagnostics)


@functools.singledispatch
def print_loss_table(objective: Objective, records: list[dict]) -> None:
  """Step / train loss / val loss, perplexity and bits per byte (an objective family may register its own)."""
  evals = [r for r in records if "val_loss" in r]
  train = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
  print(f"{'step':>6} {'train_loss':>10} {'val_loss':>9} {'val_ppl':>9} {'val_bpb':>8}")
  for r in evals:
    tl = train.get(r["step"])
    print(f"{r['step']:>6} {tl if tl is not None else float('nan'):>10.4f} {r['val_loss']:>9.4f} "
          f"{r['val_perplexity']:>9.2f} {r.get('val_bits_per_byte', float('nan')):>8.4f}")
  if len(evals) >= 2:
    print(f"final val loss / step-0 val loss = {evals[-1]['val_loss'] / evals[0]['val_loss']:.3f}")


@print_loss_table.register(preference.Preference)
def print_preference_table(objective: preference.Preference, records: list[dict]) -> None:
  """Step / train loss / val loss per pair, TRL's val rewards, and the reference-free accuracies."""
  evals = [r for r in records if "val_loss" in r]
  train = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
  print(f"{'step':>6} {'train_loss':>10} {'val_loss':>9} {'margins':>8} {'rew_acc':>7} {'pref_acc':>8} {'norm_acc':>8}")
  nan = float("nan")
  for r in evals:
    print(f"{r['step']:>6} {train.get(r['step'], nan):>10.4f} {r['val_loss']:>9.4f} "
          f"{r.get('val_rewards/margins', nan):>8.4f} {r.get('val_rewards/accuracies', nan):>7.3f} "
          f"{r.get('val_preference_accuracy', nan):>8.3f} {r.get('val_preference_accuracy_normalized', nan):>8.3f}")


@print_loss_table.register(reward_model.RewardModel)
def print_reward_model_table(objective: reward_model.RewardModel, records: list[dict]) -> None:
  """Step / train loss / val loss per pair, and TRL's accuracy, margin and mean reward on held-out pairs."""
  evals = [r for r in records if "val_loss" in r]
  train = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
  nan = float("nan")
  print(f"{'step':>6} {'train_loss':>10} {'val_loss':>9} {'accuracy':>8} {'margin':>8} {'mean_rew':>8}")
  for r in evals:
    print(f"{r['step']:>6} {train.get(r['step'], nan):>10.4f} {r['val_loss']:>9.4f} {r.get('val_accuracy', nan):>8.3f} "
          f"{r.get('val_margin', nan):>8.4f} {r.get('val_mean_reward', nan):>8.4f}")
