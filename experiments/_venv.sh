# Sourced by experiments/default.sh and tests/run.sh: makes .venv and installs the project into it
# (once per pyproject.toml version). Needs only python3 (>= 3.11) with venv and pip.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LMO_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.lmobjective-$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "setting up $VENV (pip install -e .[test]) ..." >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test]"
  touch "$STAMP"
fi
PY="$VENV/bin/python"
cd "$ROOT"
