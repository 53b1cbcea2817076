"""Cached reference log-probs (`objective.reference="cached"`, lmobjective/run/reference_cache.py).

One tiny origin (checkpoints at steps 1 and 2: two references) and one pairs file are shared by the
module. The cached table equals the live reference's `Preference.pair_logps` on the same rows (measured: equal
bit for bit on CPU; fails at 1e-5 with the table x1.000001), batches carry it by pair after the epoch
permutation (fails when looked up by counter instead: off by 20.7), a DPO run's lines are the live
run's (measured: within 1.2e-7; fails with the table x1.00001: off by 3.7e-5), the programs take no
reference params, the cache is reused, keyed (another reference, data or truncation is another
file, the stale one never opened) and a copied, edited or truncated file rebuilt with one warning.
Resuming a cached run bit for bit: tests/test_stack_cli.py (kill -9 mid-DPO).
"""

import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _stages import stage_config
from _tiny import ROOT
from lmobjective import sharding, step, validation
from lmobjective.config import ConfigError
from lmobjective.run import checkpoint as ckpt_lib
from lmobjective.run import experiment, reference_cache, train

sys.path.insert(0, os.path.join(ROOT, "tests", "faults"))
from _faults import write_text  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:data.sources.preference. eval asks for 8 pairs")
COMMON = {"data.tokenizer.kind": "byte", "data.context_length": 24, "model.num_layers": 1, "model.embed_dim": 32}


def _pairs_file(path, n=40, seed=0):
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for _ in range(n):
      w = "".join(rng.choice(list("abcdefgh"), rng.integers(3, 9)))
      f.write(json.dumps({"prompt": f"reverse {w}", "chosen": w[::-1], "rejected": w}) + "\n")
  return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  d = tmp_path_factory.mktemp("reference_cache")
  text = write_text(d / "corpus.txt")
  origin = stage_config(d / "cache", "text", text, **COMMON, **{
      "train.steps": 2, "checkpoint.every_steps": 1, "eval.num_batches": 0, "checkpoint.keep": 5})
  with contextlib.redirect_stdout(io.StringIO()):
    train.run(origin, str(d / "origin"))
  return d, _pairs_file(d / "pairs.jsonl")


def dpo_config(world, **overrides):
  d, pairs = world
  return stage_config(d / "cache", "preference_jsonl", overrides.pop("path", pairs),
                      {"val_fraction": 0.1, **overrides.pop("source_fields", {})}, **COMMON, **{
                          "objective.kind": "dpo", "train.init_from": f"{d / 'origin'}:2", "train.steps": 3,
                          "train.batch_size": 4, "train.grad_accum_steps": 2, "eval.every_steps": 3,
                          "eval.batch_size": 4, "eval.num_batches": 2, "checkpoint.every_steps": 0, **overrides})


def build(config, workdir):
  """(Experiment, what building it printed)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exp = experiment.build(config, str(workdir))
  return exp, out.getvalue()


def reference_files(world):
  d, _ = world
  return sorted(f for f in os.listdir(d / "cache") if "-reference-" in f)


@pytest.fixture(scope="module")
def cached(world):
  return build(dpo_config(world), world[0] / "cached_build")


def _live_logps(exp, batch):
  fn = jax.jit(lambda p, b: exp.objective.pair_logps(exp.model, p, b))
  logps = fn(exp.reference_params, {k: batch[k] for k in step.MODEL_FIELDS})
  return np.stack([np.asarray(logps.chosen), np.asarray(logps.rejected)], -1)


def test_the_table_equals_the_live_reference_on_the_same_rows(cached):
  exp, printed = cached
  assert "reference log-probs of 'preference': built" in printed
  for split in ("train", "val"):
    rows = exp.pipeline.pair_rows("preference", split)
    table_Nx2 = exp.pipeline.reference_logps["preference"][split]
    assert table_Nx2.shape == (rows.num_rows, 2) and table_Nx2.dtype == np.float32
    live_Nx2 = _live_logps(exp, rows.fields(np.arange(rows.num_rows)))
    np.testing.assert_allclose(table_Nx2, live_Nx2, atol=1e-5, rtol=0, err_msg=split)
    assert (table_Nx2 < 0).all()


def test_batches_carry_each_pairs_value_after_the_epoch_permutation(cached):
  exp, _ = cached
  for s in (0, 9, 10):  # 36 train pairs, 4 per step: step 9 is the second epoch, another order
    batch = exp.pipeline.batch(s)
    want_Px2 = _live_logps(exp, batch)
    np.testing.assert_allclose(batch["reference_logps"].reshape(-1, 2), want_Px2, atol=1e-5, rtol=0)
  (val0, val1), = [exp.eval_sets["preference"]]  # 4 held-out pairs in 8 slots: the second batch is padding
  np.testing.assert_allclose(val0["reference_logps"].reshape(-1, 2), _live_logps(exp, val0), atol=1e-5, rtol=0)
  assert (val1["reference_logps"] == 0).all() and not val1["loss_mask"].any()


def test_the_cached_steps_take_no_reference_params(cached, world):
  exp, _ = cached
  state = exp.init_fn(jax.random.key(0))
  batch = experiment.device_batch(exp, exp.pipeline.batch(0))
  assert "reference_logps" in batch
  for program, first in ((exp.train_fn, state), (exp.eval_fn, state.params)):  # no third argument
    assert isinstance(program, sharding.Program) and len(program.lower(first, batch).args_info[0]) == 2
  live, _ = build(dpo_config(world, **{"objective.reference": "live"}), world[0] / "live_build")
  live_batch = experiment.device_batch(live, live.pipeline.batch(0))
  assert "reference_logps" not in live_batch
  assert len(live.train_fn.lower(live.init_fn(jax.random.key(0)), live_batch).args_info[0]) == 3


def _lines(workdir):
  drop = ("positions_per_sec", "mfu")
  return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in open(workdir / "metrics.jsonl")]


@pytest.mark.slow
def test_a_cached_dpo_run_logs_the_live_runs_lines(world):
  d, _ = world
  for mode in ("cached", "live"):
    with contextlib.redirect_stdout(io.StringIO()):
      train.run(dpo_config(world, **{"objective.reference": mode}), str(d / f"run_{mode}"))
  cached_lines, live_lines = _lines(d / "run_cached"), _lines(d / "run_live")
  assert [sorted(r) for r in cached_lines] == [sorted(r) for r in live_lines]
  assert any("val_loss" in r for r in cached_lines) and any("train_loss" in r for r in cached_lines)
  for a, b in zip(cached_lines, live_lines):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0, err_msg=f"step {a['step']} {k}")


def test_a_second_run_reuses_the_file(cached, world):
  exp, _ = cached
  files = reference_files(world)
  path = os.path.join(world[0], "cache", files[0])
  mtime = os.stat(path).st_mtime_ns
  again, printed = build(dpo_config(world), world[0] / "second_build")
  assert f"reference log-probs of 'preference': reused {path}" in printed
  assert os.stat(path).st_mtime_ns == mtime and reference_files(world) == files
  for split in ("train", "val"):
    np.testing.assert_array_equal(again.pipeline.reference_logps["preference"][split],
                                  exp.pipeline.reference_logps["preference"][split])


@pytest.mark.parametrize("change", ["reference", "data", "truncation"])
def test_another_reference_data_or_truncation_is_another_file(cached, world, change, tmp_path, monkeypatch):
  exp, _ = cached
  before = set(reference_files(world))
  overrides = {"reference": {"train.init_from": f"{world[0] / 'origin'}:1"},
               "data": {"path": _pairs_file(tmp_path / "other.jsonl", seed=1)},
               "truncation": {"source_fields": {"max_response_length": 3}}}[change]
  read = []
  load = reference_cache.load
  monkeypatch.setattr(reference_cache, "load", lambda path, fields: read.append(path) or load(path, fields))
  other, printed = build(dpo_config(world, **overrides), tmp_path / "w")
  assert "reference log-probs of 'preference': built" in printed
  new = set(reference_files(world)) - before
  assert len(new) == 1 and [os.path.basename(p) for p in read] == list(new), change  # the stale file never opened
  old_train, new_train = exp.pipeline.reference_logps["preference"]["train"], other.pipeline.reference_logps[
      "preference"]["train"]
  assert old_train.shape != new_train.shape or np.abs(old_train - new_train).max() > 1e-3, change
  np.testing.assert_allclose(new_train, _live_logps(other, other.pipeline.pair_rows("preference", "train").fields(
      np.arange(len(new_train)))), atol=1e-5, rtol=0)


def test_the_key_changes_with_every_setting_that_changes_the_numbers(cached):
  exp, _ = cached
  c, src = exp.config, exp.config.data.sources["preference"]
  key = lambda config=c, model_cfg=exp.model_cfg, fp=exp.origin.params_fingerprint: reference_cache.path_for(
      "", "preference", reference_cache.key_fields(config, model_cfg, fp, exp.pipeline, "preference"))
  with_data = lambda **kw: dataclasses.replace(c, data=dataclasses.replace(c.data, **kw))
  other_source = lambda **kw: with_data(sources={"preference": dataclasses.replace(src, **kw)})
  changed = {
      "reference": key(fp="0" * 64), "context_length": key(with_data(context_length=32)),
      "document_masking": key(with_data(document_masking=False)),
      "max_prompt_length": key(other_source(max_prompt_length=5)),
      "max_response_length": key(other_source(max_response_length=5)),
      "loss_chunk_size": key(dataclasses.replace(c, objective=dataclasses.replace(c.objective, loss_chunk_size=8))),
      "compute_dtype": key(model_cfg=dataclasses.replace(exp.model_cfg, compute_dtype=jnp.bfloat16)),
      "attention": key(model_cfg=dataclasses.replace(exp.model_cfg, attention="cudnn"))}
  assert len(set(changed.values()) | {key()}) == len(changed) + 1
  # the settings a deterministic forward ignores keep the file: an SFT-style dropout, remat
  assert key(model_cfg=dataclasses.replace(exp.model_cfg, dropout=0.1, remat="full")) == key()


def _path_of(exp):
  fields = reference_cache.key_fields(exp.config, exp.model_cfg, exp.origin.params_fingerprint, exp.pipeline,
                                      "preference")
  return reference_cache.path_for(os.path.join(exp.config.data.cache_dir), "preference", fields)


WHY = {"copied": "made for another reference_params than this run's", "edited": "its tables do not match their "
       "checksum", "truncated": "unreadable (BadZipFile)"}


@pytest.mark.parametrize("damage", list(WHY))
def test_a_copied_edited_or_truncated_file_is_rebuilt_with_a_warning(cached, world, damage, tmp_path):
  exp, _ = cached
  path = _path_of(exp)
  keep = tmp_path / "good.npz"
  shutil.copy(path, keep)
  try:
    if damage == "copied":  # another reference's table under this key's name
      other, _ = build(dpo_config(world, **{"train.init_from": f"{world[0] / 'origin'}:1"}), tmp_path / "o")
      shutil.copy(_path_of(other), path)
    elif damage == "edited":  # one value changed, the stored key left as it was
      with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
      arrays["train"][0, 0] += 1.0
      np.savez(path, **arrays)
    else:
      with open(path, "r+b") as f:
        f.truncate(100)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      again, printed = build(dpo_config(world), tmp_path / "w")
    assert [str(w.message) for w in caught if "reference cache" in str(w.message)] == [
        f"reference cache {path}: {WHY[damage]}; ignoring it and scoring the pairs again"]
    assert "reference log-probs of 'preference': built" in printed
    np.testing.assert_array_equal(again.pipeline.reference_logps["preference"]["train"],
                                  exp.pipeline.reference_logps["preference"]["train"])
  finally:
    shutil.copy(keep, path)


def test_objective_reference_is_checked_where_it_means_something(world):
  c = dpo_config(world, **{"objective.reference": "precomputed"})
  with pytest.raises(ConfigError, match=r"^config.objective.reference='precomputed': must be one of cached, live$"):
    validation.validate(c)
  for kind in ("simpo", "next_token"):
    c = dpo_config(world, **{"objective.kind": kind, "objective.reference": "live"})
    with pytest.raises(ConfigError, match=rf"^config.objective.reference='live': objective.kind='{kind}' does not "
                       rf"read it \(leave it at 'cached'\); it applies to objective.kind dpo or ipo$"):
      validation.validate(c)
  # a checkpoint from before the key ran live: a DPO resume compares it, a next-token one does not
  for kind, changed in (("dpo", ["objective.reference"]), ("next_token", []), ("simpo", [])):
    now = ckpt_lib.config_json(dpo_config(world, **{"objective.kind": kind}))
    old = json.loads(json.dumps(now))
    del old["objective"]["reference"]
    assert ckpt_lib.config_changes(old, now) == changed, kind
