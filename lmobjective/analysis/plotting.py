"""Matplotlib figures of a run. Functions return figures; `save_loss_curves` writes the run's PNG.

`curves(objective, records)` is the figure of a run's metrics for its objective: `loss_curves` by
default, and an objective family registers its own (`preference_curves` for pairs, TRL's names).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from lmobjective import files
from lmobjective.objectives import Objective, preference, reward_model
from lmobjective.run.metrics_log import split_series

if TYPE_CHECKING:
  import matplotlib.pyplot as plt

LOSS_PNG = "loss_curves.png"


@functools.cache
def _pyplot():
  """matplotlib.pyplot on the Agg backend (headless-safe; notebooks still display returned figures),
  imported at the first figure: a training run does not wait 0.5 s for it before its first step."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def loss_curves(records: list[dict], title: str = "") -> plt.Figure:
  """Left: train and val loss (nats) against step, with per-source val loss dashed. Right: val perplexity."""
  fig, (ax_loss, ax_ppl) = _pyplot().subplots(1, 2, figsize=(11, 4))
  s, v = split_series(records, "train_loss")
  ax_loss.plot(s, v, label="train loss", lw=1, alpha=0.8)
  s, v = split_series(records, "val_loss")
  ax_loss.plot(s, v, "o-", label="val loss", lw=2)
  per_source = sorted({k for r in records for k in r if k.startswith("val_loss/")})
  for key in per_source:
    s, v = split_series(records, key)
    ax_loss.plot(s, v, "--", lw=1, label=key.replace("val_loss/", "val "))
  ax_loss.set(xlabel="step", ylabel="loss (nats / token)", title=title or "loss")
  ax_loss.grid(alpha=0.3)
  ax_loss.legend(fontsize=8)
  s, v = split_series(records, "val_perplexity")
  ax_ppl.plot(s, v, "o-", color="C3")
  ax_ppl.set(xlabel="step", ylabel="val perplexity", yscale="log", title="val perplexity = exp(val loss)")
  ax_ppl.grid(alpha=0.3, which="both")
  fig.tight_layout()
  return fig


def preference_curves(records: list[dict], title: str = "") -> plt.Figure:
  """A preference stage under TRL's names. Left: loss per pair. Middle: rewards (chosen, rejected,
  margins; train solid, val dots). Right: rewards/accuracies and the reference-free preference
  accuracy on held-out pairs (raw and length-normalised)."""
  fig, (ax_loss, ax_rew, ax_acc) = _pyplot().subplots(1, 3, figsize=(15, 4))
  for key, style, label in (("train_loss", "-", "train loss"), ("val_loss", "o-", "val loss")):
    ax_loss.plot(*split_series(records, key), style, label=label, lw=1.5)
  ax_loss.set(xlabel="step", ylabel="loss (per pair)", title=title or "preference loss")
  for i, name in enumerate(("chosen", "rejected", "margins")):
    ax_rew.plot(*split_series(records, f"rewards/{name}"), "-", color=f"C{i}", lw=1, label=f"rewards/{name}")
    ax_rew.plot(*split_series(records, f"val_rewards/{name}"), "o", color=f"C{i}", label=f"val_rewards/{name}")
  ax_rew.axhline(0, color="k", lw=0.5)
  ax_rew.set(xlabel="step", ylabel="implicit reward", title="rewards")
  for key, style in (("rewards/accuracies", "-"), ("val_rewards/accuracies", "o-"),
                     ("val_preference_accuracy", "s--"), ("val_preference_accuracy_normalized", "^--")):
    ax_acc.plot(*split_series(records, key), style, lw=1, label=key)
  ax_acc.set(xlabel="step", ylabel="share of pairs", ylim=(0, 1), title="accuracies")
  for ax in (ax_loss, ax_rew, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def reward_model_curves(records: list[dict], title: str = "") -> plt.Figure:
  """A reward-model stage under TRL's names. Left: loss per pair. Middle: accuracy (train solid, val
  dots). Right: the rewards' minimum, mean and maximum, and the margin."""
  fig, (ax_loss, ax_acc, ax_rew) = _pyplot().subplots(1, 3, figsize=(15, 4))
  for key, style, label in (("train_loss", "-", "train loss"), ("val_loss", "o-", "val loss")):
    ax_loss.plot(*split_series(records, key), style, label=label, lw=1.5)
  ax_loss.set(xlabel="step", ylabel="loss (per pair)", title=title or "Bradley-Terry loss")
  for key, style in (("accuracy", "-"), ("val_accuracy", "o-")):
    ax_acc.plot(*split_series(records, key), style, lw=1, label=key)
  ax_acc.set(xlabel="step", ylabel="share of pairs", ylim=(0, 1), title="accuracy")
  for i, name in enumerate(("min_reward", "mean_reward", "max_reward", "margin")):
    ax_rew.plot(*split_series(records, name), "-", color=f"C{i}", lw=1, label=name)
    ax_rew.plot(*split_series(records, f"val_{name}"), "o", color=f"C{i}", label=f"val_{name}")
  ax_rew.set(xlabel="step", ylabel="reward", title="rewards")
  for ax in (ax_loss, ax_acc, ax_rew):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


@functools.singledispatch
def curves(objective: Objective, records: list[dict], title: str = "") -> plt.Figure:
  """The figure of a run of `objective`: `loss_curves` unless its family registered another."""
  return loss_curves(records, title)


@curves.register(preference.Preference)
def _(objective: preference.Preference, records: list[dict], title: str = "") -> plt.Figure:
  return preference_curves(records, title)


@curves.register(reward_model.RewardModel)
def _(objective: reward_model.RewardModel, records: list[dict], title: str = "") -> plt.Figure:
  return reward_model_curves(records, title)


def save_loss_curves(records: list[dict], workdir: str, objective: Objective, title: str = "") -> str:
  """loss_curves.png: `curves(objective, records)`."""
  path = os.path.join(workdir, LOSS_PNG)
  fig = curves(objective, records, title)
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110)
  _pyplot().close(fig)
  return path
