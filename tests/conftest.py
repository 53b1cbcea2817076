"""One XLA compilation cache for the whole session: the suite compiles the same tiny programs in
many tests and in the CLI processes they launch, so each distinct program compiles once.

The cache is JAX's persistent compilation cache (`jax_compilation_cache_dir`) in a fresh
temporary folder, set through the environment before any test imports JAX, so that subprocesses
inherit it; it is removed at the end. A cached executable is the same binary XLA would compile
again (HLO text, `memory_analysis()` and results are unchanged), so no test's claim depends on it.
Set JAX_COMPILATION_CACHE_DIR yourself to keep a cache between sessions, or to an empty string to
compile everything afresh.
"""

import os
import shutil
import tempfile


def pytest_configure(config):
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  folder = tempfile.mkdtemp(prefix="lmobjective-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # tiny programs repeat most
  config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


# The files that take longest, longest first (setup + call + teardown under two workers, measured
# with `bash tests/run.sh --durations=0` on 2026-12-07, after the docstring cache; docs/testing.md). tests/run.sh passes
# --no-loadscope-reorder, so the two xdist workers take whole files in this order and the short files
# fill in at the end (xdist's own order, most tests first, started the longest files last).
LONGEST_FIRST = (
    "tests/faults/test_run_faults.py",
    "tests/test_reward_model.py",
    "tests/test_rl_fixed_points.py",
    "tests/test_multihost.py",
    "tests/test_sampling.py",
    "tests/test_stack_cli.py",
    "tests/test_generic_step.py",
    "tests/test_sharding.py",
    "tests/test_model.py",
    "tests/test_dpo_optimum.py",
    "tests/test_step.py",
    "tests/test_rollout.py",
    "tests/test_preference_step.py",
    "tests/test_train.py",
    "tests/test_sweep.py",
    "tests/test_checkpoint.py",
    "tests/test_restore.py",
    "tests/hf/test_load.py",
    "tests/test_hlo.py",
    "tests/test_chunked_loss.py",
    "tests/test_gpu_check.py",
    "tests/test_preference_sharding.py",
)


def pytest_collection_modifyitems(session, config, items):
  """LONGEST_FIRST's files first, in its order; every other file after them as collected."""
  file_of = lambda item: item.nodeid.split("::")[0]
  rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(file_of(item), len(rank)))  # stable: a file's tests keep their order
