"""Making FP8 weights: block-wise e4m3 quantization as DeepSeek-V3-style checkpoints store it.

The other direction of :mod:`dockyard.weights.fp8` (which dequantizes on load). Used to build FP8
checkpoints from unquantized weights: by the tests of the loader, and by the onboarding features
gate, which quantizes a shrunken copy of the model being onboarded and loads it back.

Each ``block`` tile of a weight gets one scale, ``amax(tile) / 448`` (448 is the largest finite
``float8_e4m3fn``); the stored weight is ``tile / scale`` rounded to e4m3, and the stored scale is
named ``<weight>_scale_inv`` (the value that multiplies the FP8 weight back). Tiles at the right
and bottom edges are ragged when a dimension is not a multiple of the block. The loop runs block by
block on purpose: it shares no code with the tiled dequantization it is used to check.
"""

from __future__ import annotations

import math

import torch

from dockyard.ops.fp8_format import E4M3_MAX

FP8_BLOCK = (128, 128)  # the weight_block_size of DeepSeek-V3 and Qwen3-FP8 checkpoints
# Logits of an FP8 copy against the unquantized model: rmse(fp8 - ref) / rmse(ref) stays below this.
# e4m3 keeps 3 mantissa bits: round-to-nearest errs by at most 2^-4 of a weight (normal range) or
# 2^-10 of its scale (subnormals). Over mantissas spread on [1, 2) that is an rms relative error of
# 2^-3/sqrt(12) * sqrt(E[1/m^2]) ~ 0.027 per weight (measured: 0.026). The logits inherit it from
# each quantized matmul on the path, and the independent errors add in quadrature: measured 0.045
# on a 2-layer Llama (≈ 0.026·sqrt(3)); even 8 full independent contributions give sqrt(8)·0.027 ≈
# 0.076. 0.1 stays above that, while a wrong block order, a transposed or a missing scale gives
# ratios near 1.
FP8_LOGITS_BOUND = 0.1


def fp8_quantization_config(block: tuple[int, int] | None = FP8_BLOCK) -> dict[str, object]:
    """The ``quantization_config`` of a checkpoint made by :func:`quantize_fp8_blocks` (``None``: no blocks)."""
    config: dict[str, object] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    if block is not None:
        config["weight_block_size"] = list(block)
    return config


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int] | int = FP8_BLOCK
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D ``weight`` to ``float8_e4m3fn`` with one float32 scale per ``block`` tile.

    Returns ``(q, scale_inv)``: ``q`` has ``weight``'s shape, ``scale_inv`` is
    ``(ceil(rows / bn), ceil(cols / bk))``, and ``q.float() * scale_inv`` (expanded over the
    blocks) approximates ``weight``. An all-zero tile gets a tiny scale instead of zero.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_fp8_blocks needs a 2-D weight, got shape {tuple(weight.shape)}")
    bn, bk = (block, block) if isinstance(block, int) else block
    rows, cols = weight.shape
    w = weight.detach().float().cpu()
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(math.ceil(rows / bn), math.ceil(cols / bk))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            s = tile.abs().max().clamp(min=1e-12) / E4M3_MAX
            scale[i, j] = s
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale
