#!/usr/bin/env bash
# One entry point that sets itself up: creates .venv on first use, installs somoe, then
#   ./run.sh quickstart [--data DIR] [key=value ...]   the main job (offline, on the built-in TinyStories stories)
#   ./run.sh test [pytest args]                         the test suite
#   ./run.sh somoe ARGS...                              any somoe command
set -euo pipefail
cd "$(dirname "$0")"
VENV="${SOMOE_VENV:-.venv}"
PY="${PYTHON:-python3}"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  if [ ! -f "$VENV/.somoe-installed" ] || [ pyproject.toml -nt "$VENV/.somoe-installed" ]; then
    # torch first, pinned to the CPU wheel this project is tested with, unless one is installed already
    "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "torch==${SOMOE_TORCH:-2.13.0}"
    "$VENV/bin/pip" install -q -e ".[test,analysis,hf]"
    touch "$VENV/.somoe-installed"
  fi
}

cmd="${1:-quickstart}"
shift || true
setup
case "$cmd" in
  quickstart) exec "$VENV/bin/somoe" quickstart "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
  somoe) exec "$VENV/bin/somoe" "$@" ;;
  *) echo "usage: ./run.sh quickstart|test|somoe [args]" >&2; exit 2 ;;
esac
