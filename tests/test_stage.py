"""A stage starts from another run's checkpoint (`train.init_from`, lmobjective/run/stage.py).

One tiny pretraining run (the origin, checkpoints at steps 2 and 4) is shared by the session;
stages start from it with the tokenizer training disabled, so "reused, not trained" is enforced.
"""

import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys

import jax
import ml_collections
import numpy as np
import pytest

import lmobjective
from lmobjective import config as config_lib
from lmobjective.analysis import evaluate as evaluate_cli
from lmobjective.config import ConfigError
from lmobjective.data import tokenizer_build, tokenizers
from lmobjective.optimizer import learning_rate_schedule
from lmobjective.run import checkpoint as ckpt_lib
from lmobjective.run import experiment, metrics_log, stage, train
from _tiny import ROOT, tiny_config

sys.path.insert(0, ROOT)
from configs import default  # noqa: E402

BASE = {"train.steps": 4, "checkpoint.every_steps": 2, "eval.every_steps": 2}


@contextlib.contextmanager
def no_tokenizer_training():
  def refuse(*_):
    raise AssertionError("a stage must reuse its origin's tokenizer, not train one")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(tokenizer_build, "train", refuse)
    yield


def params_of(workdir, step=None):
  return jax.device_get(lmobjective.restore(workdir, step=step).params)


def assert_same_bits(a, b):
  la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  assert len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="session")
def origin(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("origin")
  workdir, cache = str(tmp / "origin"), tmp / "cache"
  train.run(tiny_config(cache, **BASE), workdir)
  return workdir, cache


def stage_config(origin, **overrides):
  workdir, cache = origin
  return tiny_config(cache, **{**BASE, "train.steps": 2, "train.init_from": workdir, **overrides})


@pytest.fixture(scope="module")
def stage_run(origin, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stage") / "stage")
  out = io.StringIO()
  with no_tokenizer_training(), contextlib.redirect_stdout(out):
    train.run(stage_config(origin), workdir)
  return workdir, out.getvalue()


def test_step0_state_is_a_copy_of_the_origin_at_the_given_step(origin, tmp_path):
  with no_tokenizer_training():
    exp = experiment.build(stage_config(origin, **{"train.init_from": f"{origin[0]}:2"}), str(tmp_path / "s"))
  want = params_of(origin[0], step=2)
  assert exp.origin == stage.Origin(origin[0], 2, stage.params_fingerprint(want))
  state = exp.init_fn(jax.random.key(0))
  assert int(state.step) == 0
  assert_same_bits(state.params, want)
  assert_same_bits(exp.reference_params, want)
  assert_same_bits(state.opt_state, exp.tx.init(want))  # fresh: zero moments, count 0
  assert_same_bits(jax.random.key_data(state.rng), jax.random.key_data(jax.random.split(jax.random.key(0))[1]))
  ref_kernel = exp.reference_params["block_0"]["mlp"]["up"]["kernel"]
  assert ref_kernel.sharding == exp.state_sharding.params["block_0"]["mlp"]["up"]["kernel"]
  assert ref_kernel.unsafe_buffer_pointer() != state.params["block_0"]["mlp"]["up"]["kernel"].unsafe_buffer_pointer()
  exp.train_fn(state, experiment.device_batch(exp, next(exp.pipeline.train_iterator())))  # donates `state`
  assert not ref_kernel.is_deleted()
  assert_same_bits(exp.reference_params, want)


def test_stage_reuses_the_origin_tokenizer_and_records_the_origin(origin, stage_run):
  workdir, stdout = stage_run
  want = stage.Origin(origin[0], 4, stage.params_fingerprint(params_of(origin[0])))  # "WORKDIR" = newest
  tok_dir = lambda w: tokenizers.load(os.path.join(w, "tokenizer"))[0].fingerprint()
  assert tok_dir(workdir) == tok_dir(origin[0])
  assert f"init_from: {origin[0]} step 4 (params sha256 {want.params_fingerprint})" in stdout.splitlines()
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["origin"] == want.record() and cfg["train"]["init_from"] == origin[0]
  mngr = ckpt_lib.make_manager(workdir, read_only=True)
  meta = mngr.restore(2, args=ckpt_lib.ocp.args.Composite(meta=ckpt_lib.ocp.args.JsonRestore()))["meta"]
  mngr.close()
  assert meta["origin"] == want.record()
  first = next(r for r in metrics_log.read_metrics(workdir) if "lr" in r)
  c = config_lib.typed(stage_config(origin))
  assert first["step"] == 1 and first["lr"] == pytest.approx(float(learning_rate_schedule(c.optimizer, 2)(0)), rel=1e-6)


def test_restore_reads_the_stage_own_checkpoint_and_tokenizer(origin, stage_run):
  workdir, _ = stage_run
  run = lmobjective.restore(workdir)
  assert run.step == 2 and run.config.train.init_from == origin[0]
  assert run.tokenizer.fingerprint() == lmobjective.restore(origin[0]).tokenizer.fingerprint()
  leaves = zip(jax.tree.leaves(jax.device_get(run.params)), jax.tree.leaves(params_of(origin[0])))
  assert any(not np.array_equal(a, b) for a, b in leaves)  # two steps trained on top of the origin
  assert np.isfinite(run.perplexity("def f(x):\n    return x\n")["loss"])
  assert isinstance(run.generate("def ", max_new_tokens=4, temperature=0.0), str)
  assert [r["step"] for r in run.metrics if "val_loss" in r] == [0, 2]  # the stage's own metrics.jsonl
  run.plot_loss_curves()  # the notebook's plots read the same


def test_resume_restores_the_stage_checkpoint_and_the_recorded_reference(origin, stage_run):
  workdir, _ = stage_run
  cfg = stage_config(origin)
  with no_tokenizer_training():
    exp = experiment.build(cfg, workdir)
  mngr = ckpt_lib.make_manager(workdir, exp.config.checkpoint)
  try:
    state, _, _, resumed = train.restore_or_init(exp, mngr, exp.pipeline.train_iterator())
  finally:
    ckpt_lib.close(mngr)
  assert resumed == 2 and int(state.step) == 2
  assert_same_bits(state.params, lmobjective.restore(workdir).params)  # its own checkpoint, not the origin
  assert_same_bits(exp.reference_params, params_of(origin[0], step=4))
  assert exp.origin.record() == json.load(open(os.path.join(workdir, "config.json")))["origin"]


@contextlib.contextmanager
def origin_step4_replaced(origin_dir, by_step):
  """Checkpoint 4 of the origin moved aside (by_step None) or replaced by a copy of `by_step`; put back after."""
  ckpts = os.path.join(origin_dir, ckpt_lib.CKPT_DIR)
  os.rename(os.path.join(ckpts, "4"), os.path.join(ckpts, "4.aside"))
  try:
    if by_step is not None:
      shutil.copytree(os.path.join(ckpts, str(by_step)), os.path.join(ckpts, "4"))
    yield
  finally:
    shutil.rmtree(os.path.join(ckpts, "4"), ignore_errors=True)
    os.rename(os.path.join(ckpts, "4.aside"), os.path.join(ckpts, "4"))


@pytest.mark.parametrize("by_step,what", [(None, "which is gone"), (2, "which now has")])
def test_resume_refuses_a_reference_that_moved(origin, stage_run, by_step, what):
  workdir, _ = stage_run
  before = {n: open(os.path.join(workdir, n)).read() for n in ("config.json", "metrics.jsonl")}
  with origin_step4_replaced(origin[0], by_step), pytest.raises(ConfigError) as e:
    train.run(stage_config(origin, **{"train.steps": 4, "checkpoint.allow_config_change": True}), workdir)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("config.train.init_from=") and what in msg, msg
  assert {n: open(os.path.join(workdir, n)).read() for n in before} == before


def other_tokenizer(tmp_path):
  path = str(tmp_path / "bytes")
  tokenizers.save(tokenizers.ByteTokenizer(), path, {"kind": "byte"})
  return path


@pytest.mark.parametrize("overrides,key", [
    ({"train.init_from": "{tmp}/nowhere"}, "train.init_from"),
    ({"train.init_from": "{origin}:3"}, "train.init_from"),
    ({"model.num_layers": 3}, "model.num_layers"),
    ({"model.max_len": 64}, "model.max_len"),  # None resolves to context_length=32
    ({"data.tokenizer.vocab_size": 1024}, "data.tokenizer.vocab_size"),
    ({"data.tokenizer.model_type": "unigram"}, "data.tokenizer.model_type"),
    ({"data.tokenizer.kind": "byte"}, "data.tokenizer.kind"),
    ({"data.tokenizer.path": "{bytes}", "data.tokenizer.kind": "byte"}, "data.tokenizer.path"),
])
def test_refusals_are_one_line_naming_the_key_and_write_nothing(origin, tmp_path, overrides, key):
  fill = {"tmp": str(tmp_path), "origin": origin[0]}
  if "{bytes}" in overrides.values():
    fill["bytes"] = other_tokenizer(tmp_path)
  overrides = {k: v.format(**fill) if isinstance(v, str) else v for k, v in overrides.items()}
  workdir = str(tmp_path / "stage")
  with no_tokenizer_training(), pytest.raises(ConfigError) as e:
    train.run(stage_config(origin, **overrides), workdir)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"config.{key}=") and ("origin" in msg or key == "train.init_from"), msg
  assert not os.path.exists(workdir) or os.listdir(workdir) == []


def write_chat(path, n=120):
  with open(path, "w") as f:
    for i in range(n):
      a, b = i % 13, i % 7
      msgs = [{"role": "user", "content": f"what is {a} plus {b}?"},
              {"role": "assistant", "content": f"def add():\n    return {a + b}\n"}]
      f.write(json.dumps({"messages": msgs}) + "\n")


def test_sft_stage_step0_val_loss_is_the_origin_evaluated_on_the_same_rows(origin, tmp_path):
  chat = tmp_path / "chat.jsonl"
  write_chat(chat)
  cfg = stage_config(origin)
  cfg.data.sources = ml_collections.ConfigDict({"chat": default.source("chat_jsonl", 1.0, path=str(chat), val_fraction=0.1)})
  workdir = str(tmp_path / "sft")
  with no_tokenizer_training():
    train.run(cfg, workdir)
  logged = next(r for r in metrics_log.read_metrics(workdir) if r["step"] == 0)["val_loss"]
  # The origin's params through the analysis path (single device, its own program), on the SFT rows.
  run = dataclasses.replace(lmobjective.restore(origin[0]), config=config_lib.typed(cfg))
  expect = evaluate_cli.evaluate_source(run, "chat")["loss"]
  assert abs(logged - expect) < 1e-6, (logged, expect)
  kernel = run.params["block_0"]["mlp"]["up"]["kernel"]
  nudged = dataclasses.replace(run, params={**run.params, "block_0": {**run.params["block_0"], "mlp": {
      **run.params["block_0"]["mlp"], "up": {"kernel": kernel.at[0, 0].add(0.5)}}}})
  assert abs(logged - evaluate_cli.evaluate_source(nudged, "chat")["loss"]) > 1e-6  # the check can fail


def test_an_origin_from_before_a_model_key_compares_as_its_default(tmp_path):
  cfg = lambda **kw: ckpt_lib.config_json(tiny_config(tmp_path, **kw))
  older = cfg()
  del older["model"]["qk_norm"]  # an origin checkpointed before model.qk_norm existed ran without it
  stage.check_model(older, cfg(), 512, "old")
  with pytest.raises(ConfigError, match=r"config.model.qk_norm=True: the origin \(old\) has False"):
    stage.check_model(older, cfg(**{"model.qk_norm": True}), 512, "old")
