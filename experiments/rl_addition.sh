#!/usr/bin/env bash
# RL on a verifiable task, set-up included:  bash experiments/rl_addition.sh [WORKDIR]
# pretrain -> SFT -> RLOO on 2-digit addition; prints held-out pass@1 before/after RL (WORKDIR/rl_addition.md).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
WORKDIR="${1:-runs/rl_addition}"
exec "$PY" experiments/rl_addition.py --workdir="$WORKDIR" "${@:2}"
