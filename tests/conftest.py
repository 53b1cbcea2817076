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
