"""Making FP8 weights: block-wise e4m3 quantization as DeepSeek-V3-style checkpoints store it.

The other direction of :mod:`dockyard.weights.fp8` (which dequantizes on load). Used to build FP8
checkpoints from unquantized weights: by the tests of the loader, and by the onboarding features
gate, which quantizes a shrunken copy of the model being onboarded and loads it back.

Online FP8 (``--quantization fp8`` on an unquantized checkpoint, :func:`quantize_linears_fp8`): after
the weights are loaded, each projection the model lists in ``fp8_linear_names()`` becomes an
:class:`~dockyard.ops.fp8_linear.Fp8Linear` holding its weight in e4m3 with one scale per 128×128 block
(or per output row), quantized on the weight's device by ``fp8_linear.quantize_weight_blocks`` (the
same rule as :func:`quantize_fp8_blocks`, vectorized), and served by the native FP8 matmul (its
PyTorch reference math on a CPU). Other weights (embeddings, norms, lm_head, MoE expert banks, MLA)
keep the model dtype.

Each ``block`` tile of a weight gets one scale, ``amax(tile) / 448`` (448 is the largest finite
``float8_e4m3fn``); the stored weight is ``tile / scale`` rounded to e4m3, and the stored scale is
named ``<weight>_scale_inv`` (the value that multiplies the FP8 weight back). Tiles at the right
and bottom edges are ragged when a dimension is not a multiple of the block. The loop runs block by
block on purpose: it shares no code with the tiled dequantization it is used to check.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from dockyard.errors import ConfigError
from dockyard.ops.fp8_format import E4M3_MAX
from dockyard.ops.fp8_linear import Fp8Linear, quantize_weight_blocks

logger = logging.getLogger(__name__)

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
# Online FP8 against the unquantized model: Fp8Linear also rounds each activation (per token and 128-column
# group) to e4m3, the same 0.027 rms relative error again, independent of the weights'. Each quantized
# matmul then contributes sqrt(2) · 0.027 ≈ 0.038 and, by the argument above, 8 full independent
# contributions give sqrt(16) · 0.027 ≈ 0.11; 0.15 stays above that and far below the ratios near 1 of
# a wrong scale or block order.
FP8_ONLINE_LOGITS_BOUND = 0.15


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


def quantize_linears_fp8(model: nn.Module, block: tuple[int, int] | None = FP8_BLOCK) -> list[str]:
    """Online FP8: replace each projection of ``model.fp8_linear_names()`` (a loaded, unquantized model) by an
    :class:`Fp8Linear` holding its weight quantized to e4m3 with one scale per ``block`` tile (``None``: one
    scale per output row), on the same device; returns the module names converted.

    A model without FP8 projections (the generic transformers path) is a ConfigError: nothing would be
    quantized."""
    names = list(getattr(model, "fp8_linear_names", lambda: [])())
    if not names:
        raise ConfigError(f"--quantization fp8 quantizes a model's attention and MLP projections to FP8, but "
                          f"{type(model).__name__} lists none (the generic transformers path has no FP8 layers); "
                          "drop --quantization, or run a native dockyard family")
    for name in names:
        linear = model.get_submodule(name)
        tile = block if block is not None else (1, linear.in_features)
        q, scale = quantize_weight_blocks(linear.weight.detach(), tile)
        fp8 = Fp8Linear(linear.in_features, linear.out_features, tile, bias=linear.bias is not None,
                        bias_dtype=linear.weight.dtype, device=linear.weight.device)
        with torch.no_grad():
            fp8.weight.copy_(q)
            fp8.weight_scale_inv.copy_(scale)
            if linear.bias is not None:
                fp8.bias.copy_(linear.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, fp8)
    logger.info("online FP8: %d projections quantized to e4m3 (%s scales); embeddings, norms, lm_head and any "
                "MoE experts or MLA weights keep the model dtype", len(names),
                f"{block[0]}x{block[1]} block" if block is not None else "per-row")
    return names
