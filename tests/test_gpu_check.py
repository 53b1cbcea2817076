"""`experiments/gpu_check.sh --dry_run`: the GPU script's every step, on CPU at a tiny size, so it cannot rot."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_step_and_prints_the_time_to_loss_table(tmp_path):
  log = tmp_path / "gpu_check.log"
  env = dict(os.environ, PY=sys.executable, NANOGPT=str(tmp_path / "no_nanogpt"), JAX_PLATFORMS="cpu")
  proc = subprocess.run(["bash", os.path.join(ROOT, "experiments", "gpu_check.sh"), "--dry_run", str(log)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  text = log.read_text()
  assert proc.returncode == 0, text[-3000:]
  for name in ("gpu_tests", "chunked_loss_memory", "time_to_loss"):
    assert f"=== {name}: exit 0" in text, name
  assert "=== bench_nanogpt: skipped" in text
  assert "1 passed, 1 skipped" in text  # bf16 vs float32 ran; cuDNN needs a GPU
  table = text[text.index("| row | runs reaching L*"):].splitlines()
  assert table[2].startswith("| char_fast | 1/1 |")  # a tiny run reaches L* = 4 nats/char
  assert text.rstrip().endswith("all steps passed (log: " + str(log) + ")")
