"""What each stage of an objective stack changed: one table, a row per stage (pretrained, sft, dpo, ppo),
and the RLHF branch's own figures (`reward_model_row`, `ppo_row`).

Every stage's model is scored on the same three held-out sets, whatever it was trained on:
  * `pretrain_val_loss`: the pretraining run's validation rows (its sources, its eval batches),
    token-weighted over sources, nats per token;
  * `sft_val_loss`: the SFT run's held-out conversations, assistant tokens only, nats per token;
  * the DPO run's held-out pairs, each once: the reference-free `pref_accuracy` (log π(chosen|x) >
    log π(rejected|x)), `pref_accuracy_norm` (the same with length-averaged log-probs),
    `logp_margin` (mean log π(chosen|x) − log π(rejected|x), nats) and `num_pairs`;
and the DPO row adds TRL's `rewards/accuracies` and `rewards/margins` from its last val line (they
need the reference, so only the DPO stage has them). When the pairs are `stdlib_pairs`, `kind_rows`
breaks the preference accuracy down by the kind of negative (`data/stdlib_negatives.py`), and
`comparisons` says whether a stage's raw preference accuracy differs from the stage before it by more
than chance: on the same pairs, an exact McNemar test of the pairs only one of the two ranks right.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import math
import tempfile

import numpy as np

from lmobjective import files
from lmobjective.analysis import evaluate, inspection, pairs
from lmobjective.objectives import preference

COLUMNS = ("stage", "step", "pretrain_val_loss", "sft_val_loss", "pref_accuracy", "pref_accuracy_norm",
           "logp_margin", "num_pairs", "rewards/accuracies", "rewards/margins")


def _token_weighted(run: inspection.Run) -> float:
  """val_loss of `run`'s params on its config's eval sources, token-weighted over them."""
  parts = [evaluate.evaluate_source(run, name) for name in run.config.data.sources]
  tokens = sum(p["num_tokens"] for p in parts)
  return sum(p["loss"] * p["num_tokens"] for p in parts) / max(tokens, 1)


def rows(workdirs: dict[str, str]) -> list[dict]:
  """One row per stage of `workdirs` ({'pretrained': w0, 'sft': w1, 'dpo': w2[, 'ppo': w3]}, in stack order)."""
  runs = {stage: inspection.restore(w) for stage, w in workdirs.items()}
  pre, sft, dpo = runs["pretrained"], runs["sft"], runs["dpo"]
  (chat,), (pair_source,) = list(sft.config.data.sources), list(dpo.config.data.sources)
  out = []
  for stage, run in runs.items():
    on = lambda other: dataclasses.replace(other, params=run.params)  # this stage's model, other's data
    logps = pairs.pair_source_logps(on(dpo), pair_source)
    acc, valid_P = pairs.pair_metrics(logps), np.asarray(preference.pair_valid(logps))
    sft_loss = evaluate.evaluate_source(on(sft), chat)["loss"]
    row = {"stage": stage, "step": run.step, "pretrain_val_loss": _token_weighted(on(pre)), "sft_val_loss": sft_loss,
           "pref_accuracy": acc["preference_accuracy"], "pref_accuracy_norm": acc["preference_accuracy_normalized"],
           "logp_margin": acc["logps/margin"], "num_pairs": acc["num_pairs"],
           "rewards/accuracies": None, "rewards/margins": None,
           "pair_correct": (np.asarray(logps.chosen) > np.asarray(logps.rejected))[valid_P]}
    if stage == "dpo":
      last = [r for r in run.metrics if "val_loss" in r][-1]  # its last eval line: TRL's val rewards
      row.update({"rewards/accuracies": last.get("val_rewards/accuracies"), "rewards/margins": last.get("val_rewards/margins")})
    out.append(row)
  return out


def mcnemar(before_P: np.ndarray, after_P: np.ndarray) -> dict:
  """The exact McNemar test of two rankings of the same pairs (bool [P], True = ranked right): under
  "neither is better", each of the n discordant pairs is equally likely to favour either, so the
  two-sided p-value is P(Binomial(n, 1/2) as far from n/2 as the count `gained`) (1 when n = 0)."""
  before_P, after_P = np.asarray(before_P, bool), np.asarray(after_P, bool)
  gained, lost = int((after_P & ~before_P).sum()), int((before_P & ~after_P).sum())
  n, k = gained + lost, min(gained, lost)
  p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n) if n else 1.0
  return {"num_pairs": len(after_P), "gained": gained, "lost": lost,
          "difference": (gained - lost) / max(len(after_P), 1), "p_value": p}


PARENTS = {"sft": "pretrained", "dpo": "sft", "ppo": "sft"}  # the stage each one starts from


def comparisons(table: list[dict], parents: dict[str, str] | None = None) -> list[dict]:
  """`mcnemar` of each stage's held-out pair rankings against the stage it started from (`parents`,
  default PARENTS; a stage not in it against the row before it)."""
  parents, by_stage = PARENTS if parents is None else parents, {r["stage"]: r for r in table}
  out = []
  for before, row in zip(table, table[1:]):
    a = by_stage.get(parents.get(row["stage"]), before)
    out.append({"stage": row["stage"], "against": a["stage"], **mcnemar(a["pair_correct"], row["pair_correct"])})
  return out


def comparison_markdown(comparisons_: list[dict]) -> str:
  return "".join(
      f"- {c['stage']} vs {c['against']}: {c['difference']:+.4f} raw preference accuracy on {c['num_pairs']} held-out "
      f"pairs ({c['gained']} pairs gained, {c['lost']} lost; exact McNemar p = {c['p_value']:.2g})\n" for c in comparisons_)


def kind_rows(workdirs: dict[str, str]) -> list[dict] | None:
  """Per stage and kind of negative, the raw and normalised preference accuracy on the DPO run's held-out
  `stdlib_pairs` (each pair once, scored as `evaluate_pairs` scores a file); None for other pair sources."""
  from lmobjective.data import stdlib_negatives, stdlib_tasks
  dpo = inspection.restore(workdirs["dpo"])
  (source,) = dpo.config.data.sources.values()
  if source.kind != "stdlib_pairs":
    return None
  _, val, _ = stdlib_tasks.kinded_pair_splits(float(source.val_fraction), source.max_documents)
  kinds = sorted({k for _, k in val}, key=[*stdlib_negatives.DESIGN].index)
  out = []
  with tempfile.TemporaryDirectory() as tmp:
    for kind in kinds:
      with open(os.path.join(tmp, f"{kind}.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p, k in val if k == kind)
    truncation = {"max_prompt_length": source.max_prompt_length, "max_response_length": source.max_response_length}
    for stage, w in workdirs.items():
      run = dpo if stage == "dpo" else inspection.restore(w)
      for kind in kinds:
        m = pairs.evaluate_pairs(run, os.path.join(tmp, f"{kind}.jsonl"), **truncation)
        out.append({"stage": stage, "kind": kind, "num_pairs": m["num_pairs"], "pref_accuracy": m["preference_accuracy"],
                    "pref_accuracy_norm": m["preference_accuracy_normalized"], "logp_margin": m["logps/margin"]})
  return out


def kind_markdown(table: list[dict]) -> str:
  """A row per kind of negative, a column per stage: `raw / normalised` accuracy."""
  stages, kinds = list(dict.fromkeys(r["stage"] for r in table)), list(dict.fromkeys(r["kind"] for r in table))
  cell = {(r["stage"], r["kind"]): r for r in table}
  lines = ["| negative | pairs | " + " | ".join(f"{s} (raw / norm)" for s in stages) + " |", "|" + "---|" * (len(stages) + 2)]
  for k in kinds:
    lines.append(f"| {k} | {cell[stages[0], k]['num_pairs']} | " + " | ".join(
        f"{cell[s, k]['pref_accuracy']:.3f} / {cell[s, k]['pref_accuracy_norm']:.3f}" for s in stages) + " |")
  return "\n".join(lines) + "\n"


# ---- the RLHF branch: SFT -> reward model -> PPO ----------------------------------------------------


def reward_model_row(workdir: str) -> dict:
  """The reward model on every held-out pair of its source, each once, as its val lines score them
  (truncation included; `pairs.pair_source_sums`): TRL's accuracy (a tie counts half), margin and
  loss over all of them, and its last in-run val line's accuracy (its eval batches only)."""
  from lmobjective.objectives import reward_model
  rm = inspection.restore(workdir)
  (name,) = rm.config.data.sources
  m = reward_model.summarize(pairs.pair_source_sums(rm, name))
  last = [r for r in rm.metrics if "val_loss" in r][-1]
  return {"stage": "reward_model", "step": rm.step, "num_pairs": int(m["num_pairs"]), "accuracy": m["accuracy"],
          "margin": m["margin"], "loss": m["loss"], "val_accuracy": last.get("val_accuracy"),
          "val_num_pairs": last.get("val_num_pairs")}


def ppo_row(workdir: str) -> dict:
  """The PPO stage from its metrics: held-out reward (greedy, and sampled at rl.temperature) before the
  first update and after the last, and the train lines' score and KL to the reference at both ends."""
  from lmobjective.run.metrics_log import read_metrics
  records = read_metrics(workdir)
  evals, train = [r for r in records if "val_reward_sampled" in r], [r for r in records if "objective/kl" in r]
  keys = ("objective/scores", "objective/kl", "objective/kl_full", "val/var_explained")
  return {"stage": "ppo", "step": train[-1]["step"], "first_step": train[0]["step"],
          "val_reward_greedy": (evals[0]["val_reward_greedy"], evals[-1]["val_reward_greedy"]),
          "val_reward_sampled": (evals[0]["val_reward_sampled"], evals[-1]["val_reward_sampled"]),
          **{k: (train[0].get(k), train[-1].get(k)) for k in keys}, "eval_steps": (evals[0]["step"], evals[-1]["step"])}


def rlhf_markdown(rm: dict, ppo: dict) -> str:
  a, b = ppo["eval_steps"]
  s, e = ppo["first_step"], ppo["step"]
  return (f"reward model (step {rm['step']}): held-out accuracy {rm['accuracy']:.4f} on {rm['num_pairs']} pairs, "
          f"mean margin {rm['margin']:.4f}, loss {rm['loss']:.4f} (its last val line: accuracy "
          f"{_cell(rm['val_accuracy'])} on its {rm['val_num_pairs']} eval pairs)\n\n"
          "| ppo | start | end |\n|---|---|---|\n"
          f"| held-out reward, greedy (steps {a} → {b}) | {_cell(ppo['val_reward_greedy'][0])} | {_cell(ppo['val_reward_greedy'][1])} |\n"
          f"| held-out reward, sampled | {_cell(ppo['val_reward_sampled'][0])} | {_cell(ppo['val_reward_sampled'][1])} |\n"
          + "".join(f"| train {k} (lines {s} → {e}) | {_cell(ppo[k][0])} | {_cell(ppo[k][1])} |\n"
                    for k in ("objective/scores", "objective/kl", "objective/kl_full", "val/var_explained")))


def _cell(v) -> str:
  if v is None:
    return "–"
  return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(table: list[dict]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in table]
  return "\n".join(lines) + "\n"


def save(table: list[dict], workdir: str, kinds: list[dict] | None = None, rlhf: str = "") -> tuple[str, str]:
  """WORKDIR/stack.md (the table, then `kind_markdown(kinds)` and the `rlhf` text if given) and
  WORKDIR/stack.csv (written atomically)."""
  md, path_csv = os.path.join(workdir, "stack.md"), os.path.join(workdir, "stack.csv")
  with files.atomic_path(md) as tmp:
    with open(tmp, "w") as f:
      f.write(markdown(table) + "\n" + comparison_markdown(comparisons(table))
              + ("\n" + kind_markdown(kinds) if kinds else "") + ("\n" + rlhf if rlhf else ""))
  with files.atomic_path(path_csv) as tmp:
    with open(tmp, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=COLUMNS)
      w.writeheader()
      w.writerows({c: ("" if r[c] is None else r[c]) for c in COLUMNS} for r in table)
  return md, path_csv


def stage_curves(workdirs: dict[str, str]):
  """One figure, a panel per stage: pretraining and SFT train/val loss; DPO's loss, margins and accuracies."""
  import matplotlib.pyplot as plt

  from lmobjective.run.metrics_log import read_metrics, split_series
  fig, axes = plt.subplots(1, len(workdirs) + 1, figsize=(5 * (len(workdirs) + 1), 4))
  for ax, (stage, w) in zip(axes, workdirs.items()):
    records = read_metrics(w)
    ax.plot(*split_series(records, "train_loss"), lw=1, label="train loss")
    ax.plot(*split_series(records, "val_loss"), "o-", label="val loss")
    ax.set(xlabel="step", ylabel="loss (per pair)" if stage == "dpo" else "loss (nats / token)", title=stage)
  dpo = read_metrics(workdirs["dpo"])
  for key, style in (("rewards/accuracies", "-"), ("val_rewards/accuracies", "o-"), ("val_preference_accuracy", "s--"),
                     ("val_preference_accuracy_normalized", "^--")):
    axes[-1].plot(*split_series(dpo, key), style, lw=1, label=key)
  axes[-1].set(xlabel="step", ylabel="share of pairs", ylim=(0, 1), title="dpo: accuracies")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def save_curves(workdirs: dict[str, str], workdir: str) -> str:
  import matplotlib.pyplot as plt
  path = os.path.join(workdir, "stack.png")
  fig = stage_curves(workdirs)
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110)
  plt.close(fig)
  return path
