#!/usr/bin/env bash
# Set up a virtual environment (if needed) and run the test suite. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${AQJAX_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
# XLA:CPU's compiler and LLVM's JIT linker recurse deeply on big programs, on the calling thread and on threads
# whose default stack size is this limit: 256 MB (virtual; committed only as used) instead of the usual 8 MB.
ulimit -s 262144 2>/dev/null || true
exec "$VENV/bin/python" -m pytest -q --durations=15 "$@"
