"""Linear layers whose one-row calls (batch-1 decode) go to the Triton GEMV on CUDA.

cuBLAS reads a weight at 0.7–0.9 of the copy bandwidth when the activation is a single row
(benchmarks/RESULTS.md); :func:`dockyard.ops.triton_gemv.gemv` streams it faster. After loading on
CUDA, :func:`use_gemv_for_single_rows` turns the model's plain ``nn.Linear`` modules into
:class:`DecodeLinear` (same parameters); every other input, and every other device, keeps
``F.linear``. ``DOCKYARD_GEMV=0`` keeps ``F.linear`` everywhere (to compare).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from dockyard.ops.dispatch import fused_ops_enabled

GEMV_ENV = "DOCKYARD_GEMV"
# Longer rows stay on cuBLAS: at Llama's down projection (K 14336) it was as fast on an H100 (45.6 us
# against the kernel's best 46.4; benchmarks/RESULTS.md).
GEMV_MAX_K = 8192
_GEMV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def gemv_enabled(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` runs on the GEMV kernel: one contiguous row of at most ``GEMV_MAX_K``
    features, the weight's dtype, fused ops enabled for x (CUDA, or the interpreter in tests) and
    ``DOCKYARD_GEMV`` not 0."""
    if x.dim() != 2 or x.shape[0] != 1 or x.dtype != weight.dtype or x.dtype not in _GEMV_DTYPES:
        return False
    if x.shape[1] > GEMV_MAX_K:
        return False
    if os.environ.get(GEMV_ENV, "1").strip().lower() in ("0", "off", "false"):
        return False
    return x.stride(1) == 1 and weight.stride(1) == 1 and fused_ops_enabled(x)


class DecodeLinear(nn.Linear):
    """``nn.Linear`` that sends a one-row input to the Triton GEMV (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if gemv_enabled(x, self.weight):
            from dockyard.ops.triton_gemv import gemv  # Triton is an optional dependency

            return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_gemv_for_single_rows(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a :class:`DecodeLinear` in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = DecodeLinear
            count += 1
    return count


__all__ = ["DecodeLinear", "GEMV_ENV", "gemv_enabled", "use_gemv_for_single_rows"]
