#!/usr/bin/env bash
# Fresh machine → ready: set up .venv, then run the main job on the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv
.venv/bin/dockyard inspect
.venv/bin/dockyard generate --chat "What is the capital of France?"
