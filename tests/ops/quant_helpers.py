"""Quantized test weights written from the published formats, never by dockyard's own code: GGUF block rows
(``gguf`` quantizes Q4_0/Q8_0; K-quant rows are random bytes with finite scales at their published offsets)
and int4 groups (codes, scales and zeros drawn, packed and dequantized in float64 here)."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from dockyard.ops.quant_format import Int4Weight

# Byte offsets of the float16 super-block scales (d, and dmin where there is one) in llama.cpp's layouts.
_KQUANT_HALVES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def gguf_rows(qtype: str, n: int, k: int, seed: int) -> np.ndarray:
    """uint8 [n, bytes per row] of GGUF blocks: Q4_0/Q8_0 quantized by ``gguf`` itself; K-quants (which
    ``gguf`` does not quantize) random bytes with finite float16 scales at their published offsets, so
    every code, sub-block scale and min is exercised."""
    rng = np.random.default_rng(seed)
    qt = GGMLQuantizationType[qtype]
    if qtype in _KQUANT_HALVES:
        values, nbytes = GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, (n, k // values, nbytes), dtype=np.uint8)
        for offset in _KQUANT_HALVES[qtype]:
            half = rng.uniform(1e-3, 1e-2, (n, k // values)).astype(np.float16)
            raw[..., offset:offset + 2] = half.view(np.uint8).reshape(n, k // values, 2)
        return raw.reshape(n, -1)
    return gguf_quantize(rng.standard_normal((n, k)).astype(np.float32), qt)


def int4_weight(n: int, k: int, group: int, zeros: bool, act_order: bool,
                seed: int = 0) -> tuple[Int4Weight, torch.Tensor]:
    """A random :class:`Int4Weight` and its float64 dense weight in input-feature order, written from the
    format's definition (codes, (q - zero) * scale per group, stored column j multiplies feature perm[j])."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    groups = -(-k // group)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.001).to(torch.float16)
    zero = torch.randint(0, 16, (n, groups), generator=gen) if zeros else torch.full((n, groups), 8)
    padded = torch.nn.functional.pad(codes, (0, k % 2))
    packed = (padded[:, 0::2] | (padded[:, 1::2] << 4)).to(torch.uint8)
    perm = torch.randperm(k, generator=gen) if act_order else None
    g = torch.arange(k) // group
    stored = (codes.double() - zero.double()[:, g]) * scales.double()[:, g]
    dense = torch.empty_like(stored)
    dense[:, perm if perm is not None else torch.arange(k)] = stored
    weight = Int4Weight(packed, scales, zero.to(torch.uint8) if zeros else None, group, k, perm)
    return weight, dense
