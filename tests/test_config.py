"""Config boundary: keys that default to another key's value stay independent when overridden."""

import os
import re

import pytest

from lmobjective import config as config_lib
from lmobjective import validation
from lmobjective.config import ConfigError, load_config_file
from lmobjective.optimizer import learning_rate_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default():
  return load_config_file(os.path.join(ROOT, "configs/default.py"))


def test_unset_keys_follow_and_set_keys_stay_apart():
  c = default()
  c.train.steps, c.data.context_length = 50, 64
  assert config_lib.decay_steps(c) == 50 and config_lib.max_len(c) == 64
  c.optimizer.warmup_steps = 10
  c.optimizer.decay_steps, c.model.max_len = 30, 256  # in either order, nothing else moves
  c.train.steps, c.data.context_length = 80, 32
  assert (c.train.steps, config_lib.decay_steps(c)) == (80, 30)
  assert (c.data.context_length, config_lib.max_len(c)) == (32, 256)
  validation.validate(c)
  sched = learning_rate_schedule(c.optimizer, c.train.steps)
  assert float(sched(30)) == pytest.approx(c.optimizer.end_learning_rate, rel=1e-5)
  assert float(sched(79)) == pytest.approx(c.optimizer.end_learning_rate, rel=1e-5)


def test_context_longer_than_the_model_supports_is_refused():
  c = default()
  c.model.max_len = 64
  c.data.context_length = 128
  with pytest.raises(ConfigError, match=r"config.data.context_length=128: must be <= model.max_len=64"):
    validation.validate(c)


def test_decay_shorter_than_warmup_names_the_key_that_was_set():
  c = default()
  c.train.steps = 10  # decay_steps unset: it is train.steps that is too short for 40 warmup steps
  with pytest.raises(ConfigError, match=r"config.train.steps=10"):
    validation.validate(c)
  c.train.steps, c.optimizer.decay_steps = 600, 20
  with pytest.raises(ConfigError, match=r"config.optimizer.decay_steps=20"):
    validation.validate(c)


def test_one_validator_covers_every_section():
  """checkpoint.every_steps=0 is documented ("only at the end and on signals") and accepted; a bad
  nan_policy, checkpoint.keep or distributed setting is refused by the same validate()."""
  c = default()
  c.checkpoint.every_steps = 0
  validation.validate(c)
  for key, value, needle in [("train.nan_policy", "ignore", "config.train.nan_policy='ignore': must be one of stop, skip"),
                             ("checkpoint.every_steps", -1, "config.checkpoint.every_steps=-1"),
                             ("checkpoint.keep", 0, "config.checkpoint.keep=0"),
                             ("distributed.process_id", 3, "together")]:
    bad = default()
    section, leaf = key.split(".")
    bad[section][leaf] = value
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
      validation.validate(bad)


def test_an_rl_key_under_an_objective_that_samples_nothing_is_refused():
  """rl.num_generations=8 on a pretraining run would be read by nothing: refused, naming the key."""
  c = default()
  validation.validate(c)  # every rl.* key at its default: accepted
  c.rl.num_generations = 8
  with pytest.raises(ConfigError, match=r"^config.rl.num_generations=8: objective.kind='next_token' samples no "):
    validation.validate(c)


def test_sweep_planning_refuses_a_bad_nan_policy_before_launching(tmp_path):
  from lmobjective.sweep import runner as sweep

  spec = tmp_path / "spec.py"
  spec.write_text("def get_sweep(arg=None):\n"
                  f"  return {{'config': {os.path.join(ROOT, 'configs', 'tiny.py')!r}, 'overrides': "
                  "{'train.nan_policy': 'ignore'}, 'grid': {'seed': [0, 1]}}\n")
  with pytest.raises(sweep.SweepError, match="train.nan_policy='ignore'"):
    sweep.plan(str(spec), str(tmp_path / "runs"), {})
  assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_typed_config_mirrors_the_declared_keys():
  """configs/default.py converts to frozen dataclasses key for key; a key the dataclasses do not
  declare, or one they miss, is a one-line error naming it; the view is frozen."""
  import dataclasses

  c = default()
  t = config_lib.typed(c)
  assert t.train.steps == c.train.steps and t.data.sources["markov"].markov.order == c.data.sources.markov.markov.order
  assert list(t.data.sources) == list(c.data.sources)
  with pytest.raises(dataclasses.FrozenInstanceError):
    t.train.steps = 1
  extra = default()
  extra.unlock()
  extra.train.new_key = 1
  with pytest.raises(ConfigError, match=r"config.train.new_key=1: is not a declared key"):
    config_lib.typed(extra)
  missing = default()
  missing.unlock()
  del missing.eval["every_steps"]
  with pytest.raises(ConfigError, match=r"config.eval.every_steps=None: is missing"):
    config_lib.typed(missing)
  old = default()  # a run from before data.shuffle_buffer was removed still converts
  old.unlock()
  old.data.shuffle_buffer = 0
  assert config_lib.typed(old).data == t.data


def test_model_config_has_no_defaults_of_its_own():
  import dataclasses

  from lmobjective.model import ModelConfig

  assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(ModelConfig))
  m = ModelConfig.from_config(config_lib.typed(default()).model, vocab_size=2048, context_length=128)
  assert m.max_len == 128 and m.num_kv_heads == m.num_heads  # resolved from the declared config


def test_console_entry_points_find_their_default_config_from_any_directory(tmp_path):
  """From cwd=/ the default --config still resolves (an absolute path from the package): a bad
  override then fails in one line about that key, before anything is written."""
  import subprocess
  import sys

  workdir = tmp_path / "run"
  r = subprocess.run([sys.executable, "-m", "lmobjective.train", f"--workdir={workdir}", "--config.train.steps=-1"],
                     cwd="/", capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == "error: config.train.steps=-1: must be in [0, inf]"
  assert not workdir.exists()


@pytest.mark.parametrize("preset,missing", [("sft", "config.data.sources.chat.path=None"),
                                            ("dpo", "config.train.init_from=None")])
def test_stage_presets_validate_once_given_their_origin_and_data(preset, missing, tmp_path):
  from lmobjective.validation import validate
  c = load_config_file(os.path.join(ROOT, "configs", f"{preset}.py"))
  with pytest.raises(ConfigError, match=re.escape(missing)):
    validate(c)
  c.train.init_from = str(tmp_path / "origin")
  for s in c.data.sources.values():
    s.path = str(tmp_path / "data.jsonl")
  validate(c)
  assert list(c.data.sources) == [{"sft": "chat", "dpo": "pairs"}[preset]]
