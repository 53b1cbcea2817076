"""Faults of a run and of the machine: each asserts the exit code, the one line, and the files.

Kill points and disk-full are injected by `LMOBJECTIVE_FAULTS` (lmobjective/faults.py), so they
strike at named places of a save rather than at a time on a loaded machine; a real full tmpfs
is tried too when the tests run as root.
"""

import json
import os
import shutil
import subprocess

import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _faults.py (no conftest.py: tests/data has one)

from _faults import EVERY, STEPS, cli, error_lines, in_process_config, listing, make_fault_setup, temporaries  # noqa: E402
from lmobjective.analysis import diagnose, inspection  # noqa: E402
from lmobjective.config import ConfigError  # noqa: E402
from lmobjective.run import checkpoint as ckpt_lib  # noqa: E402
from lmobjective.run import metrics_log, train  # noqa: E402



@pytest.fixture(scope="module")
def fault_setup(tmp_path_factory):
  return make_fault_setup(tmp_path_factory)


def _train_losses(workdir) -> dict[int, float]:
  return {r["step"]: r["train_loss"] for r in metrics_log.read_metrics(str(workdir)) if "train_loss" in r}


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _one_error(proc, *needles):
  lines = error_lines(proc.stderr)
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for n in needles:
    assert n in errors[0], errors[0]
  return errors[0]


@pytest.fixture(scope="module")
def reference(fault_setup, tmp_path_factory):
  """The uninterrupted run every interrupted one must reproduce bit for bit."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  proc = cli(fault_setup[0], workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_kills_and_full_disks_at_named_points_lose_nothing(fault_setup, reference, tmp_path):
  """One workdir through five faults in a row, then a clean finish equal to the reference."""
  cfg, w = fault_setup[0], tmp_path / "run"
  # 1. The disk is full at the first save: one line, no way forward lost, nothing half written.
  p = cli(cfg, w, faults="save.meta@1=enospc")
  assert p.returncode == 1
  _one_error(p, f"checkpoint save at step {EVERY} failed (No space left on device", "no earlier checkpoint",
             "rerun the same command")
  assert ckpt_lib.finalized_steps(str(w)) == [] and temporaries(w) == []
  # 2. kill -9 inside the second asynchronous save (the first landed).
  p = cli(cfg, w, faults="save.meta@2=kill")
  assert p.returncode == -9
  assert ckpt_lib.finalized_steps(str(w)) == [EVERY]
  # 3. kill -9 as config.json is renamed into place at the start of the resumed run.
  config_before = (w / "config.json").read_text()
  p = cli(cfg, w, faults="atomic.rename:config.json@1=kill")
  assert p.returncode == -9 and (w / "config.json").read_text() == config_before
  assert any(".config." in t for t in temporaries(w))  # its temporary: removed by the next run
  # 4. The disk is full when a metrics line is written: one line naming the file and the checkpoint.
  p = cli(cfg, w, faults="metrics.write@4=enospc")
  assert p.returncode == 1
  _one_error(p, f"cannot write {w / 'metrics.jsonl'} (No space left on device)",
             f"the last good checkpoint, step {ckpt_lib.finalized_steps(str(w))[-1]} ")
  # 5. kill -9 in the middle of a step.
  p = cli(cfg, w, faults="step@3=kill")
  assert p.returncode == -9
  # 6. A corrupt line at or below the checkpoint step, then a clean resume to the end.
  lines = (w / "metrics.jsonl").read_text().splitlines(keepends=True)
  bad = next(i for i, line in enumerate(lines) if json.loads(line)["step"] == 1)
  lines[bad] = lines[bad][:20] + "\x00garbage\n"
  (w / "metrics.jsonl").write_text("".join(lines))
  p = cli(cfg, w)
  assert p.returncode == 0, p.stderr[-3000:]
  assert f"metrics.jsonl:{bad + 1}: unreadable line" in p.stderr
  assert temporaries(w) == []
  ref_losses, losses = _train_losses(reference), _train_losses(w)
  assert sorted(losses) == list(range(2, STEPS + 1)) and losses == {s: v for s, v in ref_losses.items() if s != 1}
  aside = [json.loads(x) for x in (w / metrics_log.UNREADABLE_FILE).read_text().splitlines()]
  assert [(a["line"], a["text"]) for a in aside] == [(bad + 1, lines[bad].rstrip("\n"))]  # kept, not deleted
  _assert_same_params(inspection.restore(str(w)).params, inspection.restore(str(reference)).params)


def _mount_tmpfs(path, size) -> bool:
  if os.geteuid() != 0 or shutil.which("mount") is None:
    return False
  os.makedirs(path, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("spare", [200_000, 150_000])
def test_a_real_full_disk_stops_at_the_failed_save_and_resumes_after_space_is_freed(fault_setup, reference, tmp_path,
                                                                                    spare):
  """A tmpfs that holds the tokenizer, metrics and two checkpoints but not a third. Where the disk
  fills (an array, a JSON item, orbax's metadata: in a thread of orbax's or the loop's) depends on
  `spare`; at 150 kB it once filled in a thread whose join() re-raised (a traceback, no line)."""
  mnt = tmp_path / "tmpfs"
  one = sum(s for p, s in listing(reference / "checkpoints" / str(EVERY)).items() if s > 0)
  if not _mount_tmpfs(mnt, f"{(2 * one + spare) // 1024}k"):
    pytest.skip("needs root and mount -t tmpfs")
  try:
    w = mnt / "run"
    p = cli(fault_setup[0], w)
    assert p.returncode == 1
    line = _one_error(p, "failed (No space left on device: " + str(w / "checkpoints"), "is intact: rerun the same command")
    good = ckpt_lib.finalized_steps(str(w))
    assert good and f"step {good[-1]}" in line and temporaries(w) == []
    subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
    p = cli(fault_setup[0], w)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _train_losses(w) == _train_losses(reference)
  finally:
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_resume_on_changed_data_is_refused_naming_the_source(fault_setup, tmp_path):
  text = tmp_path / "corpus.txt"
  shutil.copy(fault_setup[1], text)
  w = tmp_path / "run"
  cfg = lambda **o: in_process_config(fault_setup, **{"data.sources.text.path": str(text), "train.steps": 2, **o})
  train.run(cfg(), str(w))
  before = listing(w)
  text.write_text(text.read_text()[: len(text.read_text()) // 2])  # halved between preemption and resume
  more = {"train.steps": 4, "checkpoint.allow_config_change": True}
  with pytest.raises(ConfigError, match=r"config.data.sources.text='.*corpus.txt': changed since the checkpoint "
                                        r"at step 2 \(bytes \d+ -> \d+, .*train split \d+ -> \d+ tokens"):
    train.run(cfg(**more), str(w))
  assert listing(w) == before  # refused before anything was written
  train.run(cfg(**more, **{"checkpoint.allow_data_change": True}), str(w))  # the researcher who means it
  assert ckpt_lib.finalized_steps(str(w))[-1] == 4


@pytest.mark.slow
def test_a_touched_but_unchanged_source_resumes_with_a_word(fault_setup, tmp_path, capfd):
  w = tmp_path / "run"
  text = tmp_path / "corpus.txt"
  shutil.copy(fault_setup[1], text)
  cfg = lambda steps: in_process_config(fault_setup, **{"data.sources.text.path": str(text), "train.steps": steps,
                                                        "checkpoint.allow_config_change": True})
  train.run(cfg(2), str(w))
  os.utime(text, ns=(1, 1))
  train.run(cfg(4), str(w))
  assert "data.sources.text: modified time changed, sampled content identical since the checkpoint" in capfd.readouterr().err


@pytest.mark.slow
def test_a_cache_replaced_by_other_tokens_is_refused(fault_setup, tmp_path):
  """The tokenized cache is keyed by the source; one overwritten with another source's valid
  arrays would feed other tokens: its sampled ids differ from the checkpoint's."""
  w, cache = tmp_path / "run", tmp_path / "cache"
  cfg = lambda **o: in_process_config(fault_setup, **{"data.cache_dir": str(cache), "train.steps": 2, **o})
  train.run(cfg(), str(w))
  (path,) = [p for p in cache.iterdir() if p.name.startswith("text-")]
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["train_ids"] = arrays["train_ids"][::-1].copy()
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  with pytest.raises(ConfigError, match=r"data.sources.text=.*changed since the checkpoint at step 2 \(train split "
                                        r"token ids differ\)"):
    train.run(cfg(**{"train.steps": 4, "checkpoint.allow_config_change": True}), str(w))


@pytest.mark.slow
def test_every_checkpoint_damaged_refuses_then_starts_over_only_when_asked(fault_setup, tmp_path):
  w = tmp_path / "run"
  cfg = lambda **o: in_process_config(fault_setup, **{"train.steps": 4, **o})
  train.run(cfg(), str(w))
  for step in ckpt_lib.finalized_steps(str(w)):
    for d, _, names in os.walk(w / "checkpoints" / str(step) / "state"):
      for n in names:
        if "/d" in d.replace(os.sep, "/"):
          os.truncate(os.path.join(d, n), 10)
  metrics_before = (w / "metrics.jsonl").read_text()
  with pytest.raises(ConfigError, match=r"config.checkpoint.start_over=False: every checkpoint of this run is damaged"):
    train.run(cfg(), str(w))
  with pytest.raises(ConfigError, match="every checkpoint of this run is damaged"):  # and again: never step 0
    train.run(cfg(), str(w))
  assert (w / "metrics.jsonl").read_text() == metrics_before
  train.run(cfg(**{"checkpoint.start_over": True}), str(w))
  (aside,) = (w / "before_start_over").iterdir()
  assert (aside / "metrics.jsonl").read_text() == metrics_before
  assert sorted(os.listdir(aside / "checkpoints_damaged")) == ["2", "4"]
  assert ckpt_lib.finalized_steps(str(w)) == [2, 4]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_huge_learning_rate_is_a_divergence_under_both_nan_policies(fault_setup, tmp_path, policy):
  w = tmp_path / "run"
  cfg = in_process_config(fault_setup, **{"optimizer.learning_rate": 1e3, "train.nan_policy": policy,
                                          "checkpoint.every_steps": 1})
  with pytest.raises(train.Diverged, match=r"^exploded: the parameter norm .* at step 1 is .*x its initial"):
    train.run(cfg, str(w))
  assert ckpt_lib.finalized_steps(str(w)) == []  # the exploded state was never saved
  records = metrics_log.read_metrics(str(w))
  assert records[-1]["step"] == 1 and records[-1]["diverged"].startswith("exploded")
  kinds = [f["kind"] for f in diagnose.diagnose(records, vocab_size=diagnose.vocab_size_of(str(w)))]
  assert "divergence" in kinds and "not_learning" not in kinds


def _zero_gradients_from(monkeypatch, first_step):
  """train_step reporting a gradient norm of exactly 0 from `first_step` on (a dead model)."""
  import jax.numpy as jnp

  from lmobjective import step
  original = step.train_step

  def dead(state, batch, **kw):
    new, m = original(state, batch, **kw)
    return new, {**m, "grad_norm": jnp.where(new.step >= first_step, 0.0, m["grad_norm"])}

  monkeypatch.setattr(step, "train_step", dead)


@pytest.mark.slow
def test_a_dead_model_stops_after_dead_grad_steps_and_is_never_saved(fault_setup, tmp_path, monkeypatch):
  _zero_gradients_from(monkeypatch, 3)
  w = tmp_path / "run"
  with pytest.raises(train.Diverged, match=r"^dead model: the gradient norm was exactly 0 at steps 3..5"):
    train.run(in_process_config(fault_setup, **{"checkpoint.every_steps": 8}), str(w))
  assert ckpt_lib.finalized_steps(str(w)) == []
  w2 = tmp_path / "run2"  # a checkpoint is never taken of a zero-gradient state, even one step of it
  with pytest.raises(train.Diverged, match=r"^dead model: the gradient norm was exactly 0 at step 4 .* at a checkpoint"):
    train.run(in_process_config(fault_setup), str(w2))
  assert ckpt_lib.finalized_steps(str(w2)) == [2]


@pytest.mark.slow
def test_too_many_skipped_steps_is_a_divergence(fault_setup, tmp_path, monkeypatch):
  import jax.numpy as jnp

  from lmobjective import step
  original = step.train_step

  def nan_from_3(state, batch, **kw):
    new, m = original(state, batch, **kw)
    return new, {**m, "loss": jnp.where(new.step >= 3, jnp.nan, m["loss"])}

  monkeypatch.setattr(step, "train_step", nan_from_3)
  cfg = in_process_config(fault_setup, **{"train.nan_policy": "skip", "train.max_skipped_fraction": 0.25,
                                          "checkpoint.every_steps": 8})
  with pytest.raises(train.Diverged, match=r"^skipped 3 steps by step 5, more than train.max_skipped_fraction=0.25"):
    train.run(cfg, str(tmp_path / "run"))


@pytest.mark.slow
def test_divergence_exits_3_with_one_line(fault_setup, tmp_path):
  p = cli(fault_setup[0], tmp_path / "run", "optimizer.learning_rate=1e3")
  assert p.returncode == 3
  _one_error(p, "error: diverged: exploded: the parameter norm", "change it (e.g. a lower optimizer.learning_rate, or "
             "the objective's settings: objective.kind='next_token', objective.z_loss=0.0)")
  assert not (tmp_path / "run" / "checkpoints").exists() or ckpt_lib.finalized_steps(str(tmp_path / "run")) == []


def test_a_chat_source_without_assistant_turns_is_refused_before_anything_is_written(fault_setup, tmp_path):
  chats = tmp_path / "chats.jsonl"
  chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i} " * 20}]}) + "\n"
                           for i in range(50)))
  cfg = in_process_config(fault_setup)
  from configs.default import source
  cfg.data.sources.chat = source("chat_jsonl", 0.6, path=str(chats))
  w = tmp_path / "run"
  with pytest.raises(ConfigError, match=r"config.data.sources.chat.path='.*chats.jsonl': the train split of source "
                                        r"'chat' has no scored target token"):
    train.run(cfg, str(w))
  assert not w.exists()  # not even the directory
