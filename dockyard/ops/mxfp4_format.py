"""MXFP4 (OCP Microscaling FP4) as gpt-oss's checkpoints store expert weights: the layout the loader keeps and
the fused MoE kernel reads (``ops/triton_moe.py``), and its plain PyTorch meaning.

A weight ``W`` [E, rows, K] is stored as ``W_blocks`` uint8 [E, rows, K / 32, 16], two FP4 (e2m1) values per
byte, the low nibble first, and ``W_scales`` uint8 [E, rows, K / 32], one power-of-two scale per block of 32
values along K (e8m0: 2^(s - 127)). An e2m1 nibble is a sign bit and a 3-bit magnitude code 0..7 for 0, 0.5,
1, 1.5, 2, 3, 4, 6: 4.25 bits per weight with the scales. The checkpoint stores each expert bank as
[E, out, in] (the blocks run along the reduction dimension), while the model's dense parameters are
[E, in, out], so :func:`dequantize_mxfp4_tensor` transposes the last two dimensions.
"""

from __future__ import annotations

import math

import torch

from dockyard.errors import WeightsError

BLOCK = 32  # values per shared scale
E8M0_BIAS = 127
# e2m1 magnitudes by 3-bit code; the nibble's high bit is the sign.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"


def e2m1_table(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 16 values of an FP4 nibble: codes 0..7 positive, 8..15 their negatives."""
    magnitudes = torch.tensor(E2M1_MAGNITUDES, dtype=dtype)
    return torch.cat([magnitudes, -magnitudes])


def check_mxfp4_pair(blocks: torch.Tensor, scales: torch.Tensor, name: str = "weight") -> None:
    """WeightsError naming ``name`` unless ``blocks`` uint8 [..., rows, G, 16] and ``scales`` uint8 [..., rows, G]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise WeightsError(f"{name}: MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise WeightsError(f"{name}{BLOCKS_SUFFIX} {tuple(blocks.shape)} and {name}{SCALES_SUFFIX} "
                           f"{tuple(scales.shape)} do not form MXFP4 blocks ([..., G, {BLOCK // 2}] bytes with one "
                           f"scale per block of {BLOCK} values)")


def scale_code_for_rms(k: int) -> int:
    """The e8m0 code that gives uniformly random nibbles a root-mean-square value near 1/sqrt(``k``) (dummy
    weights keep activations at their scale, as dense dummy matrices do)."""
    rms = (sum(v * v for v in E2M1_MAGNITUDES) / len(E2M1_MAGNITUDES)) ** 0.5
    return E8M0_BIAS - round(math.log2(rms * math.sqrt(k)))


def dequantize_mxfp4_tensor(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                            name: str = "weight") -> torch.Tensor:
    """``blocks`` uint8 [..., rows, G, 16] and ``scales`` uint8 [..., rows, G] → [..., G·32, rows] in ``dtype``
    (the checkpoint's [out, in] per expert turned to the model's [in, out])."""
    check_mxfp4_pair(blocks, scales, name)
    table = e2m1_table().to(blocks.device)
    # Each byte gives two values, the low nibble first.
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], BLOCK).long()
    exponents = scales.to(torch.int32) - E8M0_BIAS
    values = torch.ldexp(table[codes], exponents[..., None].float())  # exact: a power-of-two scale
    weight = values.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)  # [..., rows, K]
    return weight.transpose(-1, -2).to(dtype).contiguous()


__all__ = ["BLOCK", "BLOCKS_SUFFIX", "E2M1_MAGNITUDES", "E8M0_BIAS", "SCALES_SUFFIX", "check_mxfp4_pair",
           "dequantize_mxfp4_tensor", "e2m1_table", "scale_code_for_rms"]
