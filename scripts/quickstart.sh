#!/usr/bin/env bash
# Fresh machine → ready: set up .venv, then run the main job on the bundled model: onboard it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv
.venv/bin/dockyard generate --chat "What is the capital of France?"
# Every gate (inspect, fit, equivalence, dummy, real, features, capacity, serve-smoke) on the bundled
# SmolLM2-135M-Instruct; the report lands in reports/SmolLM2-135M-Instruct.Q4_1/.
.venv/bin/dockyard onboard
