"""Onboarding: ``dockyard onboard MODEL`` runs the gates that prove the engine runs a model correctly.

Gates, in order: inspect, fit, equivalence, dummy, real, features, capacity, serve-smoke (see
``dockyard.onboard.gates``). The runner stops at the first hard failure and writes report.json,
report.md, accuracy.yaml, tutorial.md and one log per gate.

    from dockyard.onboard import OnboardOptions, run_onboard
    run = run_onboard(OnboardOptions(model="path/to/config.json", weights="dummy"))
    run.exit_code, run.gate("equivalence").status

Names are imported on first use, so registering the CLI subcommand stays light (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "GATE_NAMES": "dockyard.onboard.context",
    "GateResult": "dockyard.onboard.context",
    "OnboardOptions": "dockyard.onboard.context",
    "OnboardRun": "dockyard.onboard.runner",
    "run_onboard": "dockyard.onboard.runner",
    "summary_table": "dockyard.onboard.runner",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dockyard.onboard' has no attribute {name!r}")
