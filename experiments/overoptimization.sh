#!/usr/bin/env bash
# Reward over-optimisation, set-up included:  bash experiments/overoptimization.sh [WORKDIR] [--size=quick|full] [--sft=RUN]
# gold-labelled pairs -> proxy reward models -> PPO/RLOO against them and best-of-n; prints WORKDIR/overoptimization.md.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
WORKDIR="${1:-runs/overopt}"
exec "$PY" experiments/overoptimization.py --workdir="$WORKDIR" "${@:2}"
