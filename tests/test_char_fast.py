"""configs/char_fast.py: its like-for-like variant is nanoGPT's README CPU run key for key, both
variants validate given a text file, and the launcher's opt-in `--cpu_devices` makes that many devices."""

import os
import subprocess
import sys

import pytest

from lmobjective.config import ConfigError, load_config_file
from lmobjective.validation import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "configs", "char_fast.py")

# nanoGPT: config/train_shakespeare_char.py + the README's CPU overrides, and train.py's defaults
NANOGPT = {"data.context_length": 64, "train.batch_size": 12, "model.num_layers": 4, "model.num_heads": 4,
           "model.embed_dim": 128, "train.steps": 2000, "optimizer.learning_rate": 1e-3,
           "optimizer.end_learning_rate": 1e-4, "optimizer.warmup_steps": 100, "optimizer.b1": 0.9,
           "optimizer.b2": 0.99, "optimizer.weight_decay": 0.1, "optimizer.grad_clip": 1.0,
           "model.dropout": 0.0, "model.use_bias": False, "model.tie_embeddings": True, "model.mlp": "gelu",
           "model.norm": "layernorm", "model.position": "learned", "optimizer.schedule": "cosine",
           "optimizer.decay_embeddings": True, "optimizer.kind": "adamw", "data.tokenizer.kind": "char",
           "data.packing": "window", "eval.every_steps": 250, "eval.num_batches": 20}


def _get(c, key):
  for part in key.split("."):
    c = c[part]
  return c


def test_the_like_for_like_variant_is_nanogpts_readme_cpu_run_key_for_key():
  c = load_config_file(PRESET + ":nanogpt")
  assert {k: _get(c, k) for k in NANOGPT} == NANOGPT
  assert c.data.sources.text.val_fraction == 0.1  # prepare.py's 90/10


@pytest.mark.parametrize("arg", ["", ":nanogpt"])
def test_both_variants_validate_once_given_a_text_file(arg, tmp_path):
  c = load_config_file(PRESET + arg)
  with pytest.raises(ConfigError, match="config.data.sources.text.path"):
    validate(c)
  c.data.sources.text.path = str(tmp_path / "input.txt")
  validate(c)


@pytest.mark.slow
def test_cpu_devices_flag_runs_on_that_many_devices(tmp_path):
  text = tmp_path / "input.txt"
  text.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
  r = subprocess.run([sys.executable, "-m", "lmobjective.train", f"--config={PRESET}", f"--workdir={tmp_path / 'run'}",
                      f"--config.data.sources.text.path={text}", f"--config.data.cache_dir={tmp_path / 'cache'}",
                      "--config.train.steps=2", "--config.optimizer.warmup_steps=1", "--config.eval.every_steps=2",
                      "--config.eval.num_batches=1", "--config.checkpoint.every_steps=0", "--config.train.batch_size=4",
                      "--cpu_devices=2"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "devices 2 x cpu" in r.stdout and "mesh {'data': 2" in r.stdout, r.stdout[:2000]
