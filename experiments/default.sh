#!/usr/bin/env bash
# The default experiment, set-up included:  bash experiments/default.sh [WORKDIR] [--config.KEY=VALUE ...]
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
WORKDIR="${1:-runs/default}"
exec "$PY" -m lmobjective.train --config=configs/default.py --workdir="$WORKDIR" "${@:2}"
