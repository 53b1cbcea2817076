#!/usr/bin/env bash
# The whole test suite, set-up included (slow tests too):  bash tests/run.sh [pytest args]
# The fast tier, before each commit:                      bash tests/run.sh -m "not slow"
#
# The whole suite runs in one process, file by file (its kill -9, lock and throughput tests time
# themselves against an unloaded machine). The fast tier runs on two pytest-xdist workers, one test
# file per worker at a time (module fixtures are built once); LMOBJECTIVE_TEST_WORKERS=0 runs it in
# one process. Either way one XLA compilation cache serves the session (tests/conftest.py).
source "$(dirname "${BASH_SOURCE[0]}")/../experiments/_venv.sh"
workers=()
for arg in "$@"; do
  if [ "$arg" = "not slow" ] && [ "${LMOBJECTIVE_TEST_WORKERS:-2}" != 0 ]; then
    workers=(-n "${LMOBJECTIVE_TEST_WORKERS:-2}" --dist loadfile)
  fi
done
exec "$PY" -m pytest tests --durations=25 "${workers[@]}" "$@"
