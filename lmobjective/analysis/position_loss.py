"""Loss by position in the context: mean -log p(target) at context position t over the validation text.

The position is how many tokens of context the model had: the column index of the row, or, with
document masking, the token's position inside its document (the model cannot see past the
document start). Written at the end of a run as `val_loss_by_position.json` so a sweep can plot
one curve per context length without reloading the params.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from lmobjective import files
from lmobjective import sharding, step
from lmobjective.objectives import next_token

POSITION_FILE = "val_loss_by_position.json"


def _sums_fn(exp):
  """The per-position sums as a Program on the run's mesh (chunked like training)."""
  T, masking = exp.config.data.context_length, bool(exp.config.data.document_masking)
  chunk = exp.config.objective.loss_chunk_size

  def sums(params, batch):
    losses = next_token.score(exp.model, params, batch, chunk_size=chunk)
    pos_BxT = batch["positions"] if masking else jnp.broadcast_to(jnp.arange(T), losses.nll.shape)
    pos = jnp.clip(pos_BxT, 0, T - 1).ravel()
    valid = losses.valid.ravel()
    s_T = jax.ops.segment_sum(jnp.where(valid, losses.nll.ravel(), 0.0), pos, num_segments=T)
    n_T = jax.ops.segment_sum(valid.astype(jnp.float32), pos, num_segments=T)
    return s_T, n_T

  return sharding.Program(sums, exp.mesh, in_shardings=(exp.state_sharding.params, sharding.batch_sharding(exp.mesh)),
                          out_shardings=sharding.replicated(exp.mesh))


def loss_by_position(exp, params) -> dict:
  """{"context_length", "loss": [T], "count": [T], "loss/<source>": [T]} over the eval batches."""
  T, masking = exp.config.data.context_length, bool(exp.config.data.document_masking)
  fn = _sums_fn(exp)
  out = {"context_length": T, "document_masking": masking}
  total_s, total_n = np.zeros(T), np.zeros(T)
  for name, batches in exp.eval_sets.items():
    s_T, n_T = np.zeros(T), np.zeros(T)
    for host_batch in batches:
      batch = sharding.global_batch({k: host_batch[k] for k in step.MODEL_FIELDS}, exp.mesh)
      s, n = jax.device_get(fn(params, batch))
      s_T, n_T = s_T + np.asarray(s, np.float64), n_T + np.asarray(n, np.float64)
    out[f"loss/{name}"] = _mean(s_T, n_T)
    total_s, total_n = total_s + s_T, total_n + n_T
  out.update(loss=_mean(total_s, total_n), count=total_n.astype(int).tolist())
  return out


def _mean(s, n) -> list:
  return [float(a / b) if b else None for a, b in zip(s, n)]


def save(exp, params, workdir: str, write: bool = True) -> str | None:
  """Computes on every process (the eval batches are global), writes on the lead one."""
  if not exp.eval_sets:
    return None
  result = loss_by_position(exp, params)
  if not write:
    return None
  path = os.path.join(workdir, POSITION_FILE)
  files.write_json(path, result)
  return path


def load(run_dir: str) -> dict | None:
  return files.read_json(os.path.join(run_dir, POSITION_FILE))
