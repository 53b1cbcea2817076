"""Mixture regression: fit each source's val loss as a function of the mixture weights, suggest a mixture.

  python -m lmobjective.mixture_regression --workdir=DIR [--law=exp|linear] [--target=mean|<source>] [--verify]

DIR is a finished mixture sweep (lmobjective.sweep). Weights are each run's normalised source
weights (config.json), losses its final val_loss/<source>. Laws, for source i and weights w on the
simplex (sum_j w_j = 1, so an intercept is absorbed into the coefficients):

* exp (default; the "data mixing law" of Ye et al. 2024):  L_i(w) = c_i + exp(sum_j t_ij w_j).
  c_i >= 0 is the loss no mixture removes; the exponential gives diminishing returns from more
  of a source, so the best mixture for the average loss is usually inside the simplex, as
  measured mixture curves are. J+1 parameters per source.
* linear (baseline):  L_i(w) = sum_j b_ij w_j. Least squares; its optimum over the simplex is
  always a vertex, so it is for checking the fit, not for choosing mixtures. J parameters.

Fit quality: in-sample R^2 and leave-one-out RMSE (refit without each run, predict it). The
suggested mixture minimises the target (the mean of the per-source losses, or one source's
loss) over the simplex: a grid of step 0.005 (3 sources) or 20k Dirichlet samples, polished by
SLSQP, with every weight >= --min_weight (default: the smallest weight the sweep measured, so the
suggestion stays where the law was fitted). `--verify` trains the suggested mixture as DIR/suggested_<target>/ with the sweep's own
settings and prints predicted against measured loss per source.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys

import numpy as np
from scipy import optimize

LAWS = ("exp", "linear")
FIT_FILE = "mixture_fit.json"


@dataclasses.dataclass
class Fit:
  law: str
  sources: list[str]  # the weight axes, in order
  params: dict[str, dict]  # target source -> {"c": float, "t": [J]} (exp) or {"b": [J]} (linear)
  r2: dict[str, float]
  loo_rmse: dict[str, float]

  def predict(self, W_NxJ: np.ndarray) -> dict[str, np.ndarray]:
    W_NxJ = np.atleast_2d(np.asarray(W_NxJ, np.float64))
    return {name: _predict(self.law, p, W_NxJ) for name, p in self.params.items()}


def _predict(law: str, p: dict, W_NxJ: np.ndarray) -> np.ndarray:
  if law == "linear":
    return W_NxJ @ np.asarray(p["b"])
  return p["c"] + np.exp(np.clip(W_NxJ @ np.asarray(p["t"]), -50, 50))


def _fit_linear(W_NxJ, y_N) -> dict:
  b, *_ = np.linalg.lstsq(W_NxJ, y_N, rcond=None)
  return {"b": b.tolist()}


def _fit_exp(W_NxJ, y_N) -> dict:
  """Profile the floor c (log-space least squares for t at each c), then polish all in loss space."""
  top = float(y_N.min()) * (1 - 1e-6)

  def t_for(c):
    t, *_ = np.linalg.lstsq(W_NxJ, np.log(y_N - c), rcond=None)
    return t

  def sse(c):
    return float(np.sum((c + np.exp(W_NxJ @ t_for(c)) - y_N) ** 2))

  grid = np.linspace(0.0, top, 60)
  c0 = grid[int(np.argmin([sse(c) for c in grid]))]
  step = top / 59
  c0 = optimize.minimize_scalar(sse, bounds=(max(0.0, c0 - step), min(top, c0 + step)),
                                method="bounded", options={"xatol": 1e-10}).x
  x0 = np.concatenate([[c0], t_for(c0)])
  res = optimize.least_squares(lambda x: x[0] + np.exp(np.clip(W_NxJ @ x[1:], -50, 50)) - y_N, x0,
                               bounds=([0.0] + [-np.inf] * W_NxJ.shape[1], [top] + [np.inf] * W_NxJ.shape[1]),
                               xtol=1e-14, ftol=1e-14, gtol=1e-14)
  return {"c": float(res.x[0]), "t": res.x[1:].tolist()}


def _fit_one(law: str, W_NxJ, y_N) -> dict:
  return _fit_linear(W_NxJ, y_N) if law == "linear" else _fit_exp(W_NxJ, y_N)


def fit(W_NxJ: np.ndarray, losses: dict[str, np.ndarray], sources: list[str], law: str = "exp") -> Fit:
  """Fits every target in `losses` (name -> [N]) on the weights W [N, J] (rows sum to 1)."""
  if law not in LAWS:
    raise ValueError(f"law must be one of {LAWS}, got {law!r}")
  W_NxJ = np.asarray(W_NxJ, np.float64)
  params, r2, loo = {}, {}, {}
  n_params = W_NxJ.shape[1] + (law == "exp")
  for name, y in losses.items():
    y = np.asarray(y, np.float64)
    p = _fit_one(law, W_NxJ, y)
    params[name] = p
    resid = _predict(law, p, W_NxJ) - y
    sst = float(np.sum((y - y.mean()) ** 2))
    r2[name] = 1 - float(np.sum(resid ** 2)) / sst if sst > 0 else float("nan")
    loo[name] = _loo_rmse(law, W_NxJ, y) if len(y) > n_params else float("nan")
  return Fit(law, list(sources), params, r2, loo)


def _loo_rmse(law, W_NxJ, y_N) -> float:
  errs = []
  for k in range(len(y_N)):
    keep = np.arange(len(y_N)) != k
    p = _fit_one(law, W_NxJ[keep], y_N[keep])
    errs.append(float(_predict(law, p, W_NxJ[k:k + 1])[0] - y_N[k]))
  return float(np.sqrt(np.mean(np.square(errs))))


def objective_fn(f: Fit, target: str):
  """target 'mean' = the unweighted mean of the per-source losses; else one source's loss."""
  if target != "mean" and target not in f.params:
    raise ValueError(f"target must be 'mean' or one of {sorted(f.params)}, got {target!r}")

  def value(W_NxJ):
    pred = f.predict(W_NxJ)
    return np.mean(list(pred.values()), axis=0) if target == "mean" else pred[target]
  return value


def _candidates(J: int, step: float = 0.005, samples: int = 20_000) -> np.ndarray:
  if J <= 3:
    n = int(round(1 / step))
    pts = [c for c in itertools.product(range(n + 1), repeat=J - 1) if sum(c) <= n]
    return np.array([[*c, n - sum(c)] for c in pts], np.float64) / n
  return np.random.default_rng(0).dirichlet(np.ones(J), samples)


def suggest(f: Fit, target: str = "mean", min_weight: float = 0.0) -> tuple[np.ndarray, float]:
  """(weights [J], predicted target) minimising the target over the simplex with every w_j >= min_weight."""
  value = objective_fn(f, target)
  J = len(f.sources)
  if not 0 <= min_weight <= 1 / J:
    raise ValueError(f"min_weight must be in [0, 1/{J}], got {min_weight}")
  cands = _candidates(J)
  cands = min_weight + (1 - J * min_weight) * cands  # the simplex shrunk to w_j >= min_weight
  w0 = cands[int(np.argmin(value(cands)))]
  res = optimize.minimize(lambda w: float(value(w[None])[0]), w0, method="SLSQP",
                          bounds=[(min_weight, 1.0)] * J,
                          constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1.0}],
                          options={"ftol": 1e-12, "maxiter": 200})
  w = np.clip(res.x, min_weight, 1) if res.success else w0
  w = w / w.sum()
  if value(w[None])[0] > value(w0[None])[0]:
    w = w0
  return w, float(value(w[None])[0])


# ---- sweep directory I/O -----------------------------------------------------------------------


def sweep_data(workdir: str) -> tuple[list[str], np.ndarray, dict[str, np.ndarray], list[str]]:
  """(sources, W [N,J], val_loss per source [N], run names) over the sweep's finished runs."""
  from lmobjective.sweep import results
  from lmobjective.sweep import runner as sweep
  plan = sweep.load_plan(workdir)
  table = [r for r in results.rows(plan) if r["status"] == "done" and "val_loss" in r]
  if not table:
    raise ValueError(f"{workdir}: no finished runs with val losses")
  sources = sorted(k.split("/", 1)[1] for k in table[0] if k.startswith("weight/"))
  W = np.array([[r[f"weight/{s}"] for s in sources] for r in table])
  losses = {s: np.array([r[f"val_loss/{s}"] for r in table]) for s in sources}
  return sources, W, losses, [r["run"] for r in table]


def report(f: Fit, w: np.ndarray, predicted: float, target: str, W_obs: np.ndarray) -> str:
  lines = [f"law: {f.law} ({'L_i = c_i + exp(sum_j t_ij w_j)' if f.law == 'exp' else 'L_i = sum_j b_ij w_j'}),"
           f" fitted on {len(W_obs)} runs"]
  lines.append(f"{'source':>10} {'R^2':>7} {'LOO RMSE':>9}  params")
  for name, p in f.params.items():
    ps = ", ".join(f"{k}={np.round(v, 4).tolist()}" for k, v in p.items())
    lines.append(f"{name:>10} {f.r2[name]:>7.4f} {f.loo_rmse[name]:>9.4f}  {ps}")
  mix = ", ".join(f"{s} {x:.3f}" for s, x in zip(f.sources, w))
  lines.append(f"suggested mixture for target '{target}': {mix} -> predicted {predicted:.4f}")
  outside = [s for j, s in enumerate(f.sources) if w[j] < W_obs[:, j].min() - 1e-9 or w[j] > W_obs[:, j].max() + 1e-9]
  if outside:
    lines.append(f"warning: outside the measured range for {', '.join(outside)} (extrapolation)")
  return "\n".join(lines)


def verify(workdir: str, f: Fit, w: np.ndarray, target: str) -> dict:
  """Trains the suggested mixture with the sweep's settings; returns predicted vs measured per source."""
  from lmobjective.sweep import results
  from lmobjective.sweep import runner as sweep
  plan = sweep.load_plan(workdir)
  name = f"suggested_{target}"
  first = next(iter(plan["runs"].values()))
  ov = {k: v for k, v in first.items() if not (k.startswith("data.sources.") and k.endswith(".weight"))}
  ov.update({f"data.sources.{s}.weight": repr(float(round(x, 4))) for s, x in zip(f.sources, w)})
  plan["runs"] = {name: ov}
  if not sweep.run_all(plan, [name]) == []:
    raise RuntimeError(f"the verification run {name} failed; see {workdir}/{name}/train.log")
  row = results.run_row(os.path.join(workdir, name), name, ov)
  pred = {s: float(v[0]) for s, v in f.predict(w[None]).items()}
  out = {s: {"predicted": pred[s], "measured": row[f"val_loss/{s}"]} for s in f.sources}
  pm = np.mean([v["predicted"] for v in out.values()])
  mm = np.mean([v["measured"] for v in out.values()])
  out["mean"] = {"predicted": float(pm), "measured": float(mm)}
  return out


def main(argv) -> None:
  from absl import flags
  F = flags.FLAGS
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments: {argv[1:]}")
  try:
    sources, W, losses, names = sweep_data(F.workdir)
    f = fit(W, losses, sources, F.law)
    min_weight = W.min() if F.min_weight is None else F.min_weight
    w, predicted = suggest(f, F.target, min_weight)
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(report(f, w, predicted, F.target, W))
  other = fit(W, losses, sources, next(law for law in LAWS if law != F.law))
  print(f"for comparison, the {other.law} law's LOO RMSE: " + ", ".join(
      f"{s} {other.loo_rmse[s]:.4f}" for s in sources))
  out = {"runs": names, **dataclasses.asdict(f), "target": F.target,
         "suggested": dict(zip(sources, w.tolist())), "predicted": predicted}
  if F.verify:
    check = verify(F.workdir, f, w, F.target)
    print(f"{'':>10} {'predicted':>9} {'measured':>9} {'error':>7}")
    for k, v in check.items():
      print(f"{k:>10} {v['predicted']:>9.4f} {v['measured']:>9.4f} {v['measured'] - v['predicted']:>+7.4f}")
    out["verify"] = check
  with open(os.path.join(F.workdir, FIT_FILE), "w") as fh:
    json.dump(out, fh, indent=1, default=float)


def cli() -> None:
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "A finished mixture sweep directory.", required=True)
  flags.DEFINE_enum("law", "exp", list(LAWS), "exp: c + exp(t.w) (data mixing law); linear: b.w.")
  flags.DEFINE_string("target", "mean", "What the suggested mixture minimises: mean, or a source name.")
  flags.DEFINE_float("min_weight", None, "Smallest weight a suggested source may get; default: the smallest "
                     "weight any run of the sweep used (so the suggestion interpolates, not extrapolates).")
  flags.DEFINE_bool("verify", False, "Train the suggested mixture and report predicted vs measured.")
  from lmobjective.commands import parse_flags
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
