"""The FP8 block format both FP8 paths share: e4m3 limits, the activation group, the scale-grid shape and
the rule that an activation group lies inside one weight scale block. A leaf module, so the PyTorch path
(:mod:`dockyard.ops.fp8_linear`) and the Triton kernels (:mod:`dockyard.ops.triton_fp8`) both import it
without importing each other."""

from __future__ import annotations

import math

import torch

GROUP = 128  # activation quantization group (columns) = the GEMM's K tile
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-12  # a group of zeros gets this amax (scale ~2e-15) instead of a zero scale
FP8_DTYPE = torch.float8_e4m3fn


def check_block(block: tuple[int, int], in_features: int, where: str = "Fp8Linear") -> None:
    """Raise ValueError unless every 128-column activation group lies inside one weight scale block."""
    bn, bk = block
    if bn < 1 or bk < 1:
        raise ValueError(f"{where}: scale block {block} must be positive")
    if bk % GROUP and bk < in_features:
        raise ValueError(
            f"{where}: weight scale block {list(block)} has {bk} columns, but the FP8 kernel quantizes "
            f"activations in groups of {GROUP} columns, which must each fall in one scale block (block "
            f"columns a multiple of {GROUP}, or at least in_features={in_features}); dequantize this "
            "checkpoint on load instead (DOCKYARD_FP8_NATIVE=0)"
        )


def scale_grid_shape(out_features: int, in_features: int, block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the scale grid for a weight [out_features, in_features] under ``block`` (ragged last tiles)."""
    return math.ceil(out_features / block[0]), math.ceil(in_features / block[1])
