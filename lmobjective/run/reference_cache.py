"""Cached reference log-probs (`objective.reference="cached"`, the default of DPO and IPO).

Before the first step the frozen reference scores every pair of each pair source's train and val
splits once: the summed response log-probs of its chosen and rejected rows, through the one function
the steps use (`next_token.sequence_logps`) on the rows training reads (same truncation, `loss_chunk_size` as configured),
in batches of eval.batch_size pairs sharded like eval, gathered so every process holds the table.
A table is float32 [pairs, 2] (column 0 chosen, 1 rejected), row i pair i of the split in order;
batches then carry each row's value (`Pipeline.attach_reference`) and the step has no reference
forward and no reference params.

Each source's tables live beside its tokenized data, `<data cache dir>/<source>-reference-<key>.npz`,
written atomically by every process (the same bytes: a cache dir need not be shared; all processes
score, or none does). The key hashes everything the numbers depend on (`key_fields`): the reference
params' fingerprint, the source's token-cache key (its config, files and tokenizer) and its
splits' token fingerprints, context length, truncation and document masking, and the forward's
settings (the resolved model config, the backend, loss_chunk_size). Another reference, other data or
another truncation is another file, built fresh. A file whose stored fields differ from the ones asked
for (copied or edited), whose tables fail their checksum, or that does not read, is rebuilt with one
warning naming it (as the token cache does): a stale table is never used, and no run stops for one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings

import jax
import numpy as np

from lmobjective import faults, files, sharding
from lmobjective.objectives import next_token
from lmobjective.batch import MODEL_FIELDS
from lmobjective.data import cache, tokenized
from lmobjective.data.errors import DataWarning
from lmobjective.run.save_watch import WriteFailed

FORMAT = 1
SPLITS = ("train", "val")
FORWARD_FREE = ("dropout", "remat")  # model settings that leave a deterministic forward's numbers alone


def key_fields(config, model_cfg, params_fingerprint: str, pipeline, name: str) -> dict:
  """What source `name`'s table depends on; its hash names the file, and the file stores it."""
  scfg = config.data.sources[name]
  data = pipeline.fingerprints()[name]
  return {"format": FORMAT, "reference_params": params_fingerprint,
          "token_cache_key": tokenized.cache_key(name, scfg, pipeline.tok),
          "data": {k: data.get(k) for k in ("content", "train", "val")},
          "context_length": config.data.context_length, "document_masking": config.data.document_masking,
          "max_prompt_length": scfg.max_prompt_length, "max_response_length": scfg.max_response_length,
          "model": {k: str(v) for k, v in dataclasses.asdict(model_cfg).items() if k not in FORWARD_FREE},
          "loss_chunk_size": config.objective.loss_chunk_size, "backend": jax.default_backend()}


def path_for(directory: str, name: str, fields: dict) -> str:
  return os.path.join(directory, f"{name}-reference-{cache.key(fields)}.npz")


def _checksum(tables: dict[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for split in SPLITS:
    h.update(np.ascontiguousarray(tables[split], np.float32).tobytes())
  return h.hexdigest()


def save(path: str, fields: dict, tables: dict[str, np.ndarray]) -> None:
  """Whole or not at all; a failed write (a full disk) stops the run in one line (`WriteFailed`), not
  numpy's and zipfile's chained tracebacks."""
  meta = json.dumps({"key": fields, "sha256": _checksum(tables)}, sort_keys=True, default=str)
  try:
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
      faults.point("reference.save", path)
      np.savez(f, meta=np.array(meta), **{s: tables[s].astype(np.float32) for s in SPLITS})
  except OSError as e:
    raise WriteFailed(f"cannot write {path} ({e.strerror or e}): the reference log-probs' cache (data.cache_dir); "
                      "nothing else was written: free space and rerun the same command") from None


def load(path: str, fields: dict) -> dict[str, np.ndarray] | None:
  """The tables of `path`, or None: missing, or (warned, to be rebuilt) unreadable, for other fields, damaged."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      meta, tables = json.loads(str(z["meta"])), {s: z[s] for s in SPLITS}
  except Exception as e:  # truncated or foreign: rebuild, never stop the run
    return _stale(path, f"unreadable ({type(e).__name__})")
  want = json.loads(json.dumps(fields, sort_keys=True, default=str))
  differ = sorted(k for k in set(want) | set(meta.get("key", {})) if meta.get("key", {}).get(k) != want.get(k))
  if differ:
    return _stale(path, f"made for another {differ[0]} than this run's")
  if meta.get("sha256") != _checksum(tables):
    return _stale(path, "its tables do not match their checksum")
  return tables


def _stale(path: str, why: str) -> None:
  warnings.warn(f"reference cache {path}: {why}; ignoring it and scoring the pairs again", DataWarning, stacklevel=3)
  return None


def scorer(model, mesh, params_sharding, loss_chunk_size: int) -> sharding.Program:
  """(params, batch of 2G rows, pair ids [G]) -> (log-probs [G, 2], the ids), replicated on every device."""
  def score(params, batch, pair_G):
    rows = next_token.sequence_logps(model, params, batch, chunk_size=loss_chunk_size)
    return rows.logp.reshape(-1, 2), pair_G  # row 2i chosen, 2i+1 rejected
  shard = sharding.batch_sharding(mesh)
  return sharding.Program(score, mesh, in_shardings=(params_sharding, shard, shard),
                          out_shardings=sharding.replicated(mesh))


def table(program, params, rows, pairs_per_batch: int, mesh) -> np.ndarray:
  """float32 [rows.num_rows, 2]: the reference's log-probs of every pair of `rows` (unshuffled `PairRows`).

  Process p feeds its share of each global batch; the pair ids ride along, so the gathered values land
  by id whatever the device order. The last batch wraps around; the wrapped pairs (id -1) are dropped.
  """
  n, local = rows.num_rows, pairs_per_batch // jax.process_count()
  out_Nx2 = np.full((n, 2), np.nan, np.float32)
  for first in range(0, n, pairs_per_batch):
    ctr_L = first + jax.process_index() * local + np.arange(local)
    f = rows.fields(ctr_L)
    host = {**{k: f[k] for k in MODEL_FIELDS}, "pair": np.where(ctr_L < n, ctr_L, -1).astype(np.int32)}
    dev = sharding.global_batch(host, mesh)
    logp_Gx2, pair_G = jax.device_get(program(params, {k: dev[k] for k in MODEL_FIELDS}, dev["pair"]))
    keep = pair_G >= 0
    out_Nx2[pair_G[keep]] = logp_Gx2[keep]
  if np.isnan(out_Nx2).any():
    raise RuntimeError(f"reference cache: {int(np.isnan(out_Nx2).any(1).sum())} of {n} pairs were not scored")
  return out_Nx2


def _all_hit(hit: bool) -> bool:
  """Every process found the file (a cache dir need not be shared: all score, or none does)."""
  if jax.process_count() == 1:
    return hit
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.array([hit]))).all())


def _split_table(program, params, pipeline, name: str, split: str, pairs_per_batch: int, mesh) -> np.ndarray:
  src = pipeline.sources[pipeline.source_index(name)]
  if getattr(src, split).num_documents == 0:  # e.g. val_fraction=0: nothing held out
    return np.zeros((0, 2), np.float32)
  return table(program, params, pipeline.pair_rows(name, split), pairs_per_batch, mesh)


def prepare(config, pipeline, model, model_cfg, mesh, params_sharding, params, params_fingerprint: str,
            directory: str) -> dict[str, dict[str, np.ndarray]]:
  """{source: {"train", "val": float32 [pairs, 2]}} for every source, read from the cache or built and
  saved; one line per source says which (with the time a build took)."""
  program = scorer(model, mesh, params_sharding, config.objective.loss_chunk_size)
  out = {}
  for name in pipeline.source_names:
    fields = key_fields(config, model_cfg, params_fingerprint, pipeline, name)
    path = path_for(directory, name, fields)
    tables = load(path, fields)
    if _all_hit(tables is not None):
      _say(f"reference log-probs of '{name}': reused {path} ({_count(tables)})")
    else:
      t0 = time.perf_counter()
      tables = {s: _split_table(program, params, pipeline, name, s, config.eval.batch_size, mesh) for s in SPLITS}
      seconds = time.perf_counter() - t0
      save(path, fields, tables)  # by every process, as the token cache is: a cache dir need not be shared
      _say(f"reference log-probs of '{name}': built {path} ({_count(tables)}) in {seconds:.2f} s")
    out[name] = tables
  return out


def _count(tables) -> str:
  return f"{len(tables['train'])} train + {len(tables['val'])} val pairs"


def _say(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)
