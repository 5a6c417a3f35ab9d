#!/usr/bin/env bash
# Build a fresh virtualenv (nothing installed by hand can hide a missing step) and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-test
rm -rf "$venv"
bash scripts/setup_env.sh "$venv"
"$venv/bin/ruff" check .
exec "$venv/bin/python" -m pytest -q --durations=15 "$@"
