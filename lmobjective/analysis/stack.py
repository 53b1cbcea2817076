"""What each stage of an objective stack changed: one table, a row per stage (pretrained, sft, dpo, ppo,
rloo), one of every policy on the RL stages' held-out prompts (`policy_scores`, `policy_rows`), and the
RLHF branch's own figures (`reward_model_row`, `rl_row`).

Every stage's model is scored on the same three held-out sets, whatever it was trained on:
  * `pretrain_val_loss`: the pretraining run's validation rows (its sources, its eval batches),
    token-weighted over sources, nats per token;
  * `sft_val_loss`: the SFT run's held-out conversations, assistant tokens only, nats per token;
  * the DPO run's held-out pairs, each once: the reference-free `pref_accuracy` (log π(chosen|x) >
    log π(rejected|x)), `pref_accuracy_norm` (the same with length-averaged log-probs),
    `logp_margin` (mean log π(chosen|x) − log π(rejected|x), nats) and `num_pairs`;
and the DPO row adds TRL's `rewards/accuracies` and `rewards/margins` from its last val line (they
need the reference, so only the DPO stage has them). `docstring_acc` and `docstring_acc_norm` are the shipped
multiple-choice task (`data/stdlib_choice.py`: a held-out function's docstring summary among four,
scored as lm-evaluation-harness scores multiple choice, `analysis/choice.py`), where the SFT source is the
stdlib's conversations (`stdlib_chat`), whose held-out modules it is built from. When the pairs are `stdlib_pairs`, `kind_rows`
breaks the preference accuracy down by the kind of negative (`data/stdlib_negatives.py`), and
`comparisons` says whether a stage's raw preference accuracy differs from the stage before it by more
than chance: on the same pairs, an exact McNemar test of the pairs only one of the two ranks right.

The policy table answers each held-out prompt of an RL stage with every policy from SFT on (DPO's,
PPO's, RLOO's) and scores the answers with that stage's own reward terms: the gold reward it watches,
the proxy (its reward model) it optimises, pass@1 (a greedy answer with gold 1), and the KL to the
reference (SFT) the RL stages pay for it; each against SFT on the same prompts, with a paired bootstrap
interval for the rewards and an exact McNemar test for pass@1.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import math
import tempfile

import ml_collections
import numpy as np

from lmobjective import files
from lmobjective.analysis import choice, evaluate, inspection, pairs
from lmobjective.objectives import preference

COLUMNS = ("stage", "step", "pretrain_val_loss", "sft_val_loss", "pref_accuracy", "pref_accuracy_norm",
           "logp_margin", "num_pairs", "rewards/accuracies", "rewards/margins", "docstring_acc", "docstring_acc_norm")


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
  from lmobjective.data import stdlib_choice
  chat_source = sft.config.data.sources[chat]  # the task is held out where SFT is the stdlib's conversations
  items = stdlib_choice.items(float(chat_source.val_fraction)) if chat_source.kind == "stdlib_chat" else None
  out = []
  for stage, run in runs.items():
    on = lambda other: dataclasses.replace(other, params=run.params)  # this stage's model, other's data
    logps = pairs.pair_source_logps(on(dpo), pair_source)
    acc, valid_P = pairs.pair_metrics(logps), np.asarray(preference.pair_valid(logps))
    sft_loss = evaluate.evaluate_source(on(sft), chat)["loss"]
    row = {"stage": stage, "step": run.step, "pretrain_val_loss": _token_weighted(on(pre)), "sft_val_loss": sft_loss,
           "pref_accuracy": acc["preference_accuracy"], "pref_accuracy_norm": acc["preference_accuracy_normalized"],
           "logp_margin": acc["logps/margin"], "num_pairs": acc["num_pairs"],
           "rewards/accuracies": None, "rewards/margins": None, "docstring_acc": None, "docstring_acc_norm": None,
           "pair_correct": (np.asarray(logps.chosen) > np.asarray(logps.rejected))[valid_P]}
    if items:
      task = choice.evaluate(run, items)
      row.update({"docstring_acc": task["acc"], "docstring_acc_norm": task["acc_norm"]})
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


PARENTS = {"sft": "pretrained", "dpo": "sft", "ppo": "sft", "rloo": "sft"}  # the stage each one starts from


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


def rl_row(workdir: str) -> dict:
  """An RL stage (PPO, RLOO) from its metrics: held-out reward (greedy, and sampled at rl.temperature)
  before the first update and after the last, and the train lines' score and KL to the reference at both ends."""
  from lmobjective.run.metrics_log import read_metrics
  records = read_metrics(workdir)
  evals, train = [r for r in records if "val_reward_sampled" in r], [r for r in records if "objective/kl" in r]
  keys = ("objective/scores", "objective/kl", "objective/kl_full", "val/var_explained")
  return {"stage": os.path.basename(os.path.normpath(workdir)), "step": train[-1]["step"],
          "first_and_last": (train[0]["step"], train[-1]["step"]),
          "val_reward_greedy": (evals[0]["val_reward_greedy"], evals[-1]["val_reward_greedy"]),
          "val_reward_sampled": (evals[0]["val_reward_sampled"], evals[-1]["val_reward_sampled"]),
          **{k: (train[0].get(k), train[-1].get(k)) for k in keys}, "eval_steps": (evals[0]["step"], evals[-1]["step"])}


def rlhf_markdown(rm: dict, rl_rows: list[dict]) -> str:
  """The reward model's line, then a column pair (start, end) per RL stage of `rl_rows` (`rl_row`)."""
  head = "| | " + " | ".join(f"{r['stage']} start | {r['stage']} end" for r in rl_rows) + " |\n"
  row = lambda label, key: f"| {label} | " + " | ".join(f"{_cell(r[key][0])} | {_cell(r[key][1])}" for r in rl_rows) + " |\n"
  return (f"reward model (step {rm['step']}): held-out accuracy {rm['accuracy']:.4f} on {rm['num_pairs']} pairs, "
          f"mean margin {rm['margin']:.4f}, loss {rm['loss']:.4f} (its last val line: accuracy "
          f"{_cell(rm['val_accuracy'])} on its {rm['val_num_pairs']} eval pairs)\n\n"
          + head + "|---|" + "---|---|" * len(rl_rows) + "\n"
          + row("steps of the held-out evals", "eval_steps") + row("train lines", "first_and_last")
          + row("held-out reward, greedy", "val_reward_greedy") + row("held-out reward, sampled", "val_reward_sampled")
          + "".join(row(f"train {k}", k) for k in ("objective/scores", "objective/kl", "objective/kl_full", "val/var_explained")))


# ---- every policy on the RL stages' held-out prompts ---------------------------------------------------


def _raw_config(workdir: str) -> ml_collections.ConfigDict:
  """The config `workdir`'s newest checkpoint was trained with, as the run read it (the raw ConfigDict)."""
  from lmobjective.run import checkpoint as ckpt_lib
  mngr = ckpt_lib.make_manager(workdir, read_only=True)
  try:
    found = ckpt_lib.latest_config(mngr)
  finally:
    ckpt_lib.close(mngr)
  if found is None:
    raise FileNotFoundError(f"no readable checkpoint in {workdir}")
  return ml_collections.ConfigDict(ckpt_lib.with_added_keys(found[1]))


POLICY_STREAM = -2  # rollout.EVAL_STREAM + this: the policy table's samples, never an RL eval's or a training iteration's


def policy_scores(rl_workdir: str, workdirs: dict[str, str], probe: str,
                  eval_prompts: str | None = None) -> dict[str, dict[str, np.ndarray]]:
  """Each stage of `workdirs` as a policy on the held-out prompts of the RL run in `rl_workdir` (or the
  prompts_jsonl file `eval_prompts`), scored by
  that run's reward terms exactly as its eval lines score them (`rollout.eval_scores`, one stream for
  every stage, so stages answer with the same random numbers): per prompt [P], `gold_greedy` (the
  weight-0 term it watches, on the greedy answer), `gold`, `proxy` (the reward-model term) and `kl` (the
  full-distribution KL(π‖π_ref) summed over each response, π_ref the RL run's reference: its
  init_from), each the mean over rl.eval_samples sampled answers. `probe` is a scratch workdir."""
  import jax

  from lmobjective.run import rollout, scorer
  config = _raw_config(rl_workdir)
  if eval_prompts:
    config.rl.eval_prompts = eval_prompts
  rlx = rollout.build(config, probe)
  names, weights = rlx.rewards.names, rlx.rewards.weights_F
  (gold,) = [n for n, w in zip(names, weights) if w == 0 and n != scorer.TERM]
  stream = rollout.EVAL_STREAM + POLICY_STREAM
  out = {}
  for stage, w in workdirs.items():
    params = {k: v for k, v in inspection.restore(w).params.items() if k != "score_head"}  # PPO's value head
    params = jax.device_put(params, rlx.ms.params_sharding)
    greedy = rollout.eval_scores(rlx, params, rlx.eval_prompts, greedy=True, stream=stream)
    sampled = rollout.eval_scores(rlx, params, rlx.eval_prompts, greedy=False, stream=stream, with_kl=True,
                                  samples_per_prompt=rlx.config.rl.eval_samples)
    out[stage] = {"gold_greedy": greedy.per_term[gold][:, 0], "gold": sampled.per_term[gold].mean(1),
                  "proxy": sampled.per_term[scorer.TERM].mean(1), "kl": sampled.kl_full.mean(1)}
  return out


def paired_bootstrap(before_P, after_P, resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
  """The mean of after − before over P paired items and its percentile bootstrap interval (items
  resampled with replacement, `resamples` times)."""
  diff_P = np.asarray(after_P, np.float64) - np.asarray(before_P, np.float64)
  idx = np.random.default_rng(seed).integers(0, len(diff_P), (resamples, len(diff_P)))
  low, high = np.quantile(diff_P[idx].mean(1), [(1 - level) / 2, (1 + level) / 2])
  return {"difference": float(diff_P.mean()), "low": float(low), "high": float(high)}


def policy_rows(scores: dict[str, dict[str, np.ndarray]], against: str = "sft") -> list[dict]:
  """A row per stage of `policy_scores`: the means, pass@1 (the share of prompts whose greedy answer
  scores gold 1: for summary F1, the summary's words exactly), and against the `against` stage
  (the same prompts): `paired_bootstrap` of the gold and the proxy reward, an exact `mcnemar` of pass@1."""
  base = scores[against]
  out = []
  for stage, s in scores.items():
    row = {"stage": stage, "num_prompts": len(s["gold"]), "gold_greedy": float(s["gold_greedy"].mean()),
           "pass@1": float((s["gold_greedy"] >= 1.0).mean()), "gold": float(s["gold"].mean()),
           "proxy": float(s["proxy"].mean()), "kl": float(s["kl"].mean())}
    if stage != against:
      row.update({"gold_vs": paired_bootstrap(base["gold"], s["gold"]), "proxy_vs": paired_bootstrap(base["proxy"], s["proxy"]),
                  "pass@1_vs": mcnemar(base["gold_greedy"] >= 1.0, s["gold_greedy"] >= 1.0)})
    out.append(row)
  return out


def policy_markdown(table: list[dict], against: str = "sft") -> str:
  interval = lambda c: f"{c['difference']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"
  lines = ["| policy | prompts | gold, greedy | pass@1 | gold, sampled | proxy, sampled | KL to the reference | "
           f"gold − {against} [95% CI] | proxy − {against} [95% CI] | pass@1 vs {against}: McNemar p |",
           "|---|" + "---|" * 9]
  for r in table:
    vs = (f"{interval(r['gold_vs'])} | {interval(r['proxy_vs'])} | {r['pass@1_vs']['p_value']:.2g}"
          if "gold_vs" in r else "– | – | –")
    lines.append(f"| {r['stage']} | {r['num_prompts']} | {r['gold_greedy']:.4f} | {r['pass@1']:.4f} | {r['gold']:.4f} | "
                 f"{r['proxy']:.4f} | {r['kl']:.4f} | {vs} |")
  return "\n".join(lines) + "\n"


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
