"""RMSNorm (statistics in float32, like the HF implementations); one fused Triton kernel on CUDA.

Two weightings exist: Llama's ``x̂ · w`` (w starts at 1) and Gemma's ``x̂ · (1 + w)`` (w starts at 0,
applied in float32); ``one_plus`` picks the second. The PyTorch expression below is the reference
and the CPU path; :func:`dockyard.ops.triton_fused.rms_norm` computes the same on the GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from dockyard.ops.dispatch import fused_ops_enabled


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight (or * (1 + weight)), with the mean of squares taken in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, one_plus: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size) if one_plus else torch.ones(hidden_size))
        self.eps = eps
        self.one_plus = one_plus

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | tuple[
        torch.Tensor, torch.Tensor
    ]:
        """Normalize ``x``; with ``residual``, first add it and also return the sum (fused-op shape)."""
        if fused_ops_enabled(x):
            from dockyard.ops.triton_fused import rms_norm  # Triton is an optional dependency

            return rms_norm(x, self.weight, self.eps, self.one_plus, residual)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.one_plus:
            out = (xf * (1.0 + self.weight.float())).to(dtype)
        else:
            out = self.weight * xf.to(dtype)
        return out if residual is None else (out, residual)
