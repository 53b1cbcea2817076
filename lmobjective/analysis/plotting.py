"""Matplotlib figures of a run. Functions return figures; `save_loss_curves` writes the run's PNG."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # headless-safe; notebooks still display returned figures
import matplotlib.pyplot as plt  # noqa: E402

from lmobjective import files
from lmobjective.run.metrics_log import split_series  # noqa: E402

LOSS_PNG = "loss_curves.png"


def loss_curves(records: list[dict], title: str = "") -> plt.Figure:
  """Left: train and val loss (nats) against step, with per-source val loss dashed. Right: val perplexity."""
  fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
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


def save_loss_curves(records: list[dict], workdir: str, title: str = "") -> str:
  path = os.path.join(workdir, LOSS_PNG)
  fig = loss_curves(records, title)
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110)
  plt.close(fig)
  return path
