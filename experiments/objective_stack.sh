#!/usr/bin/env bash
# The objective stack, set-up included:  bash experiments/objective_stack.sh [WORKDIR] [--size=quick|full]
# pretrain -> SFT -> DPO on offline stdlib data, each stage from the previous; prints WORKDIR/stack.md.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
WORKDIR="${1:-runs/stack}"
exec "$PY" experiments/objective_stack.py --workdir="$WORKDIR" "${@:2}"
