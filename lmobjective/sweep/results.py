"""Sweep results: one row per run in DIR/results.{csv,md}, and the sweep's PNG plots.

  python -m lmobjective.sweep --sweep=... --workdir=DIR --results_only   # rebuild from finished runs

Rows read each run's config.json (context length, normalised source weights), metrics.jsonl (last
train and eval lines), DONE.json (wall time), diagnostics.json (findings) and
val_loss_by_position.json (the loss-by-position plot).
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lmobjective import files  # noqa: E402
from lmobjective.analysis import diagnose, position_loss  # noqa: E402
from lmobjective.run import metrics_log  # noqa: E402

PLOTS = {"curves": "sweep_loss_curves.png", "mixture": "mixture_per_source.png",
         "context": "context_length.png", "position": "loss_by_position.png"}
METRICS = ("tokens_seen", "wall_s", "train_loss", "val_loss", "val_perplexity", "val_bits_per_byte")


def _json(path: str) -> Any:
  return files.read_json(path)


def run_row(run_dir: str, name: str, overrides: dict[str, str]) -> dict[str, Any]:
  row: dict[str, Any] = {"run": name, **overrides}
  done = _json(os.path.join(run_dir, "DONE.json"))
  cfg = _json(os.path.join(run_dir, "config.json"))
  has_metrics = os.path.exists(os.path.join(run_dir, metrics_log.METRICS_FILE))
  row["status"] = "done" if done else ("incomplete" if has_metrics else "not started")
  if cfg:
    row["context_length"] = cfg["data"]["context_length"]
    w = {n: float(s["weight"]) for n, s in cfg["data"]["sources"].items()}
    total = sum(w.values()) or 1.0
    row.update({f"weight/{n}": v / total for n, v in w.items()})
  if has_metrics:
    records = metrics_log.read_metrics(run_dir)
    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    if train:
      row.update(tokens_seen=train[-1]["tokens_seen"], train_loss=train[-1]["train_loss"])
    if evals:
      row.update({k: v for k, v in evals[-1].items() if k.startswith("val_") and k != "val_bits_per_token"})
    findings = diagnose.load(run_dir)
    if findings is None:
      findings = diagnose.diagnose(records, diagnose.vocab_size_of(run_dir))
    row["findings"] = diagnose.summarize(findings)
  if done:
    row["wall_s"] = done["wall_s"]
  return row


def rows(plan: dict) -> list[dict]:
  return [run_row(os.path.join(plan["workdir"], n), n, _varying(plan)[n]) for n in plan["runs"]]


def _varying(plan: dict) -> dict[str, dict]:
  """Each run's overrides minus those every run shares (they say nothing about the row)."""
  common = {**plan["common"], **plan["extra"]}
  return {n: {k: v for k, v in ov.items() if common.get(k) != v} for n, ov in plan["runs"].items()}


def columns(table: list[dict]) -> list[str]:
  keys = list(dict.fromkeys(k for r in table for k in r))
  sources = sorted({k.split("/", 1)[1] for k in keys if k.startswith("val_loss/")})
  overrides = [k for k in keys if "." in k and "/" not in k]
  fixed = ["run", "status", *overrides, "context_length", *(f"weight/{s}" for s in sources), *METRICS,
           *(f"val_loss/{s}" for s in sources), *(f"val_bits_per_byte/{s}" for s in sources), "findings"]
  return [c for c in fixed if any(c in r for r in table)]


def _fmt(v: Any, col: str) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    if not math.isfinite(v):
      return str(v)
    return f"{v:.0f}" if col == "wall_s" else f"{v:.3f}" if col.startswith("weight/") else f"{v:.4f}"
  return str(v)


def write_csv(table: list[dict], path: str) -> None:
  cols = columns(table)
  with files.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(table)


def markdown(table: list[dict]) -> str:
  """The table with short override names (code.weight for data.sources.code.weight)."""
  from lmobjective.sweep.spec import short_keys
  cols = columns(table)
  short = short_keys([c for c in cols if "." in c and "/" not in c])
  short = {k: v if "." in v or len(k.split(".")) < 2 else ".".join(k.split(".")[-2:]) for k, v in short.items()}
  lines = ["| " + " | ".join(short.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(_fmt(r.get(c), c) for c in cols) + " |" for r in table]
  return "\n".join(lines) + "\n"


# ---- plots -------------------------------------------------------------------------------------


def plot_curves(plan: dict) -> plt.Figure:
  """Train loss (thin) and val loss (markers) of every run against tokens seen."""
  fig, ax = plt.subplots(figsize=(9, 5))
  for i, name in enumerate(plan["runs"]):
    run_dir = os.path.join(plan["workdir"], name)
    if not os.path.exists(os.path.join(run_dir, metrics_log.METRICS_FILE)):
      continue
    records = metrics_log.read_metrics(run_dir)
    tokens = {r["step"]: r["tokens_seen"] for r in records if "tokens_seen" in r}
    tokens[0] = 0
    s, v = metrics_log.split_series(records, "train_loss")
    ax.plot([tokens.get(x, np.nan) for x in s], v, lw=0.8, alpha=0.6, color=f"C{i % 10}")
    s, v = metrics_log.split_series(records, "val_loss")
    ax.plot([tokens.get(x, np.nan) for x in s], v, "o-", ms=3, color=f"C{i % 10}", label=name)
  ax.set(xlabel="tokens seen", ylabel="loss (nats / token)", title="train (thin) and val (dots) loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_mixture(table: list[dict]) -> plt.Figure | None:
  """Per-source val loss against that source's (normalised) weight."""
  sources = sorted({k.split("/", 1)[1] for r in table for k in r if k.startswith("val_loss/")})
  pts = [r for r in table if "val_loss" in r]
  if not sources or len({tuple(r.get(f"weight/{s}") for s in sources) for r in pts}) < 2:
    return None
  fig, axes = plt.subplots(1, len(sources), figsize=(4 * len(sources), 3.6), squeeze=False)
  for ax, s in zip(axes[0], sources):
    ax.plot([r[f"weight/{s}"] for r in pts], [r[f"val_loss/{s}"] for r in pts], "o")
    ax.set(xlabel=f"weight of {s}", ylabel=f"val loss on {s} (nats)", title=s)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def _group(r: dict) -> str:
  w = [f"{k.split('/')[1]}={v:.2f}" for k, v in r.items() if k.startswith("weight/")]
  return " ".join(w)


def plot_context(table: list[dict]) -> plt.Figure | None:
  """Val loss and bits per byte against context length (one line per mixture)."""
  pts = [r for r in table if "val_loss" in r and "context_length" in r]
  if len({r["context_length"] for r in pts}) < 2:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  groups = sorted({_group(r) for r in pts})
  for i, g in enumerate(groups):
    sel = sorted((r for r in pts if _group(r) == g), key=lambda r: r["context_length"])
    x = [r["context_length"] for r in sel]
    for ax, key in zip(axes, ("val_loss", "val_bits_per_byte")):
      ax.plot(x, [r.get(key, np.nan) for r in sel], "o-", color=f"C{i}", label=g if len(groups) > 1 else None)
  for ax, label in zip(axes, ("val loss (nats / token)", "val bits per byte")):
    ax.set_xscale("log", base=2)
    ax.set(xlabel="context length (tokens)", ylabel=label)
    ax.minorticks_off()
    ax.set_xticks(sorted({r["context_length"] for r in pts}), labels=sorted({r["context_length"] for r in pts}))
    ax.grid(alpha=0.3)
  if len(groups) > 1:
    axes[0].legend(fontsize=7)
  fig.tight_layout()
  return fig


def log_binned(loss: list, count: list, per_octave: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """Token-weighted mean loss in log-spaced position bins (positions 1..T); x = the bins' mean position."""
  y = np.array([np.nan if v is None else v for v in loss], np.float64)
  n = np.asarray(count, np.float64) * np.isfinite(y)
  edges = np.floor(2 ** (np.arange(0, np.log2(len(y)) * per_octave + 2) / per_octave)).astype(int)
  edges = np.unique(np.append(edges[edges <= len(y)], len(y) + 1))  # the last bin ends after position T
  xs, ys = [], []
  for a, b in zip(edges[:-1], edges[1:]):
    w = n[a - 1:b - 1]
    if w.sum() > 0:
      pos = np.arange(a, b)[: len(w)]
      xs.append(float((pos * w).sum() / w.sum()))
      ys.append(float((np.nan_to_num(y[a - 1:b - 1]) * w).sum() / w.sum()))
  return np.array(xs), np.array(ys)


def plot_position(plan: dict) -> plt.Figure | None:
  """Mean -log p at context position t (validation text) for every run that wrote it."""
  curves = {n: position_loss.load(os.path.join(plan["workdir"], n)) for n in plan["runs"]}
  curves = {n: c for n, c in curves.items() if c}
  if not curves:
    return None
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for i, (name, c) in enumerate(curves.items()):
    x, y = log_binned(c["loss"], c["count"])
    ax.plot(x, y, "o-", ms=2, lw=1, color=f"C{i % 10}", label=f"{name} (T={c['context_length']})")
  ax.set(xscale="log", xlabel="position in context t (1 = no context; log-spaced bins)",
         ylabel="mean -log p(token at t) (nats)", title="loss by position in the context (validation text)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def _save(fig: plt.Figure | None, path: str) -> str | None:
  if fig is None:
    return None
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110)
  plt.close(fig)
  return path


def write_all(plan: dict, verbose: bool = True) -> list[dict]:
  """results.csv, results.md and the plots that apply; prints the markdown table."""
  d = plan["workdir"]
  table = rows(plan)
  write_csv(table, os.path.join(d, "results.csv"))
  md = markdown(table)
  files.atomic_write(os.path.join(d, "results.md"), f"# Sweep {plan['sweep']}\n\n{plan.get('description', '')}\n\n{md}")
  _save(plot_curves(plan), os.path.join(d, PLOTS["curves"]))
  _save(plot_mixture(table), os.path.join(d, PLOTS["mixture"]))
  _save(plot_context(table), os.path.join(d, PLOTS["context"]))
  _save(plot_position(plan), os.path.join(d, PLOTS["position"]))
  if verbose:
    print(md, flush=True)
  return table
