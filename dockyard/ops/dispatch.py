"""Which implementation of a small op runs: the fused Triton kernels on CUDA, the reference elsewhere.

The reference (PyTorch) ops are the oracle and the CPU path; ``DOCKYARD_FUSED_OPS=0`` keeps them on
the GPU too (to compare, or to bisect a numerical difference).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

FUSED_ENV = "DOCKYARD_FUSED_OPS"


@functools.cache
def triton_installed() -> bool:
    """Whether Triton is installed (found without importing it: the one answer every op asks for)."""
    return importlib.util.find_spec("triton") is not None


def fused_ops_enabled(x: torch.Tensor) -> bool:
    """Whether the fused kernels of :mod:`dockyard.ops.triton_fused` serve ``x``: a CUDA tensor with
    Triton installed, unless ``DOCKYARD_FUSED_OPS=0``. A CPU tensor qualifies only with
    ``DOCKYARD_FUSED_OPS=1`` under ``TRITON_INTERPRET=1`` (how the tests run the kernels)."""
    setting = os.environ.get(FUSED_ENV, "auto").strip().lower()
    if setting in ("0", "off", "false") or not triton_installed():
        return False
    if x.device.type == "cuda":
        return True
    return setting in ("1", "on", "true") and os.environ.get("TRITON_INTERPRET", "0") == "1"
