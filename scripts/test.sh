#!/usr/bin/env bash
# Build a fresh virtualenv (nothing installed by hand can hide a missing step) and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-test
rm -rf "$venv"
bash scripts/setup_env.sh "$venv"
"$venv/bin/ruff" check .
# Two pytest-xdist workers, one per core of the CI machine, each module on one worker (tests/conftest.py
# gives each worker an equal share of the cores as torch threads); later arguments override,
# e.g. `bash scripts/test.sh -n 0` for one process.
exec "$venv/bin/python" -m pytest -q --durations=15 -n 2 --dist loadfile "$@"
