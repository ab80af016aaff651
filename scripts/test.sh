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
# Compiling is single-threaded per program: two processes (pytest-xdist, whole modules per worker so module
# fixtures such as test servers are shared) keep both cores of a small machine busy. AQJAX_TEST_WORKERS=1: one.
NPROC="$(nproc 2>/dev/null || echo 2)"
WORKERS="${AQJAX_TEST_WORKERS:-$(( NPROC < 4 ? NPROC : 4 ))}"
PAR=()
[ "$WORKERS" -gt 1 ] && PAR=(-n "$WORKERS" --dist loadfile)
exec "$VENV/bin/python" -m pytest -q --durations=15 "${PAR[@]}" "$@"
