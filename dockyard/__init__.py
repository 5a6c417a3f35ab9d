"""dockyard: an LLM inference engine whose first job is onboarding models.

The public Python API mirrors vLLM's: ``from dockyard import LLM, SamplingParams``. Those names
are imported on first use so that light commands (``dockyard inspect``) stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_LAZY = {
    "LLM": "dockyard.engine.llm",
    "EngineArgs": "dockyard.engine_args",
    "SamplingParams": "dockyard.engine.sampling_params",
    "RequestOutput": "dockyard.engine.outputs",
    "CompletionOutput": "dockyard.engine.outputs",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dockyard' has no attribute {name!r}")
