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
  assert "=== bench_sampling: exit 0" in text or "=== bench_sampling: skipped (no torch or transformers" in text
  assert "1 passed, 1 skipped" in text  # bf16 vs float32 ran; cuDNN needs a GPU
  table = text[text.index("| row | runs reaching L*"):].splitlines()
  assert table[2].startswith("| char_fast | 1/1 |")  # a tiny run reaches L* = 4 nats/char
  assert text.rstrip().endswith("all steps passed (log: " + str(log) + ")")


def test_the_script_parses_and_every_flag_it_passes_is_defined():
  """The fast tier's share: `bash -n`, and each `--flag=` given to an experiments/*.py script is one
  that script defines (a renamed flag would otherwise fail only on the GPU machine, or in the slow
  dry run)."""
  import re

  script = os.path.join(ROOT, "experiments", "gpu_check.sh")
  assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
  text = open(script).read().replace("\\\n", " ")
  calls = re.findall(r'"\$PY" (experiments/\w+\.py)([^\n]*)', text)
  assert {c[0] for c in calls} == {"experiments/bench_loss.py", "experiments/bench_nanogpt.py",
                                   "experiments/bench_time_to_loss.py", "experiments/bench_sampling.py"}
  for path, args in calls:
    source = open(os.path.join(ROOT, path)).read()
    defined = set(re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', source))
    passed = set(re.findall(r"--(\w+)=", args))
    assert passed and passed <= defined, (path, sorted(passed - defined))
