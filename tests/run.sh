#!/usr/bin/env bash
# The whole test suite, set-up included (slow tests too):  bash tests/run.sh [pytest args]
# The fast tier, before each commit:                      bash tests/run.sh -m "not slow"
#
# Both run on two pytest-xdist workers (the machine's two cores), one test file per worker at a time
# (--dist loadfile: a file's module fixtures are built once). LMOBJECTIVE_TEST_WORKERS=0 runs in one
# process, LMOBJECTIVE_TEST_WORKERS=N on N workers. Either way one XLA compilation cache serves the
# session (tests/conftest.py). The tests that time something (kill -9 at a step, the lock's renewal,
# positions/s) wait on what they watch with deadlines, not on an idle machine.
source "$(dirname "${BASH_SOURCE[0]}")/../experiments/_venv.sh"
workers=()
if [ "${LMOBJECTIVE_TEST_WORKERS:-2}" != 0 ]; then
  workers=(-n "${LMOBJECTIVE_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder)
fi
exec "$PY" -m pytest tests --durations=25 "${workers[@]}" "$@"
