#!/usr/bin/env bash
# The whole test suite, set-up included (slow tests too):  bash tests/run.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/../experiments/_venv.sh"
exec "$PY" -m pytest tests --durations=25 "$@"
