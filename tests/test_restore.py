"""`lmobjective.restore` and the evaluation CLI on a run trained on 8 simulated devices, read back on 1."""

import json
import math
import os
import subprocess
import sys

import jax
import matplotlib.figure
import numpy as np
import pytest

import lmobjective
from lmobjective.run import metrics_log, train
from _tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = 'def add(a, b):\n    """Return the sum of a and b."""\n    return a + b\n'
OVERRIDES = {"train.steps": 6, "checkpoint.every_steps": 3, "eval.every_steps": 6, "mesh.data": 1, "mesh.fsdp": -1}

# Trains on 8 devices (parameters and optimizer state sharded 8 ways over fsdp), then scores TEXT
# with the live, sharded parameters of the last checkpoint.
TRAIN_ON_8 = """
import dataclasses, json, sys
import jax
assert jax.device_count() == 8
import lmobjective
from lmobjective.config import load_config_file
from lmobjective.run import experiment, train
cache, workdir, text, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
c = load_config_file("configs/tiny.py")
c.data.cache_dir = cache
for k, v in overrides.items():
  *parents, leaf = k.split("."); node = c
  for p in parents: node = node[p]
  node[leaf] = v
train.run(c, workdir)
exp = experiment.build(c, workdir)
state, *_ = train.restore_or_init(exp, train.ckpt_lib.make_manager(workdir, c.checkpoint), exp.pipeline.train_iterator())
kernel = state.params["block_0"]["mlp"]["up"]["kernel"]
assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
run = dataclasses.replace(lmobjective.restore(workdir), params=state.params)
print("NLL=" + json.dumps(run.loss_per_position(text).nll.tolist()))
"""


def tiny(cache, **overrides):
  return tiny_config(cache, **{**OVERRIDES, **overrides})


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("r8")
  workdir, cache = tmp / "run", tmp / "cache"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  r = subprocess.run([sys.executable, "-c", TRAIN_ON_8, str(cache), str(workdir), TEXT, json.dumps(OVERRIDES)],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  nll8 = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("NLL="))[4:])
  return workdir, cache, np.asarray(nll8)


@pytest.mark.slow
def test_restore_on_one_device_matches_the_8_device_training_process(run8):
  workdir, _, nll8 = run8
  run = lmobjective.restore(str(workdir))
  assert run.step == 6 and run.config.train.steps == 6
  pl = run.loss_per_position(TEXT)
  assert len(pl.tokens) == len(nll8) == len(run.tokenizer.encode(TEXT))
  np.testing.assert_allclose(pl.nll, nll8, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pl.p_target, np.exp(-pl.nll), rtol=1e-6)
  assert "".join(pl.tokens) == TEXT  # the targets are the text, token by token


@pytest.mark.slow
def test_training_resumes_on_a_different_device_count(run8, tmp_path):
  workdir, cache, _ = run8
  import shutil
  shutil.copytree(workdir, tmp_path / "run")
  train.run(tiny(cache, **{"train.steps": 8, "checkpoint.allow_config_change": True}), str(tmp_path / "run"))
  steps = [r["step"] for r in metrics_log.read_metrics(str(tmp_path / "run")) if "train_loss" in r]
  assert steps == list(range(1, 9))
  assert lmobjective.restore(str(tmp_path / "run")).step == 8


@pytest.mark.slow
def test_notebook_api(run8):
  workdir, _, _ = run8
  run = lmobjective.restore(str(workdir))
  assert run.metrics == metrics_log.read_metrics(str(workdir))
  pl = run.loss_per_position(TEXT)
  assert pl.mean == pytest.approx(float(np.mean(pl.nll)))
  ppl = run.perplexity([TEXT])
  assert ppl["num_tokens"] == len(pl.nll) and ppl["loss"] == pytest.approx(pl.mean, rel=1e-6)
  assert ppl["perplexity"] == pytest.approx(math.exp(pl.mean), rel=1e-6)
  assert ppl["bits_per_byte"] == pytest.approx(pl.nll.sum() / math.log(2) / len(TEXT.encode()), rel=1e-6)
  top = run.next_token_distribution("def add(a, b):\n", top_k=5)
  probs = [p for _, _, p in top]
  assert len(top) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
  # the distribution agrees with loss_per_position: p(first body token | header)
  header = "def add(a, b):\n"
  full = run.next_token_distribution(header, top_k=run.tokenizer.vocab_size)
  p_by_id = {i: p for _, i, p in full}
  pl_header = run.loss_per_position(header + "    return")
  n_header = len(run.tokenizer.encode(header))
  assert p_by_id[int(pl_header.target_ids[n_header])] == pytest.approx(pl_header.p_target[n_header], rel=1e-4)
  text = run.generate("def ", max_new_tokens=8, temperature=0.8, top_k=20, seed=1)
  assert isinstance(text, str)
  assert run.generate_ids("def ", 8, 0.0) == run.generate_ids("def ", 8, 0.0, use_cache=False)
  for fig in (run.plot_loss_curves(), run.plot_loss_per_position(TEXT), run.plot_next_token("def ")):
    assert isinstance(fig, matplotlib.figure.Figure)


@pytest.mark.slow
def test_evaluate_cli(run8, tmp_path):
  workdir, _, _ = run8
  final = [r for r in metrics_log.read_metrics(str(workdir)) if "val_loss" in r][-1]
  r = subprocess.run([sys.executable, "-m", "lmobjective.evaluate", f"--workdir={workdir}", "--source=code"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  out = dict(l.split(None, 1) for l in r.stdout.strip().splitlines())
  assert float(out["loss"].split()[0]) == pytest.approx(final["val_loss/code"], rel=1e-5)  # the training eval
  assert float(out["bits_per_byte"]) == pytest.approx(final["val_bits_per_byte/code"], rel=1e-5)
  (tmp_path / "t.txt").write_text(TEXT)
  r = subprocess.run([sys.executable, "-m", "lmobjective.evaluate", f"--workdir={workdir}",
                      f"--text_file={tmp_path / 't.txt'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  out = dict(l.split(None, 1) for l in r.stdout.strip().splitlines())
  assert int(out["bytes"]) == len(TEXT.encode())
  assert float(out["perplexity"]) == pytest.approx(math.exp(float(out["loss"].split()[0])), rel=1e-4)
  # the same text as a one-row per-document table: the same scored positions, the same loss
  table = tmp_path / "docs.jsonl"
  r = subprocess.run([sys.executable, "-m", "lmobjective.evaluate", f"--workdir={workdir}",
                      f"--text_file={tmp_path / 't.txt'}", f"--per_document={table}"], cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  (row,) = [json.loads(l) for l in table.read_text().splitlines()]
  assert row["id"] == "t.txt" and row["bytes"] == len(TEXT.encode())
  assert row["loss"] == pytest.approx(float(out["loss"].split()[0]), abs=2e-6)


def test_restore_of_a_run_without_checkpoints_names_the_folder_and_writes_nothing(tmp_path):
  """The fast tier's share of this file: a reader never creates what it looks for."""
  empty = tmp_path / "never_trained"
  with pytest.raises(FileNotFoundError, match=f"no checkpoints in {empty}/checkpoints$"):
    lmobjective.restore(str(empty))
  assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_cli_writes_what_the_import_reads_back(run8, tmp_path):
  """`python -m lmobjective.export` of the trained run (configs/tiny.py: RoPE, RMSNorm, SwiGLU, tied: Llama's
  architecture): the directory imports back to the run's own params, bit for bit, and its logits."""
  from lmobjective.hf import load as hf_load
  workdir, _, _ = run8
  out = tmp_path / "hf"
  r = subprocess.run([sys.executable, "-m", "lmobjective.export", f"--workdir={workdir}", f"--out={out}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert lines[0].startswith("note: the run's sentencepiece tokenizer has no tokenizer.json form here")
  assert lines[1] == f"wrote {out} (step 6):" and any("model.safetensors" in l for l in lines)
  assert json.load(open(out / "config.json"))["architectures"] == ["LlamaForCausalLM"]
  run = lmobjective.restore(str(workdir))
  model, params, _ = hf_load.import_model(str(out), context_length=run.context_length)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(run.params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  ids = np.asarray([run.tokenizer.encode(TEXT)], np.int32)
  np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, ids)),
                                np.asarray(run.model.apply({"params": run.params}, ids)))
