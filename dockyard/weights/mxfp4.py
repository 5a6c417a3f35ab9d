"""MXFP4 checkpoints (gpt-oss as published): the expert weights dequantized on load.

Format (OCP Microscaling, MXFP4; gpt-oss's ``quantization_config.quant_method: mxfp4``): a weight
``W`` [E, rows, K] is stored as ``W_blocks`` uint8 [E, rows, K / 32, 16], two FP4 (e2m1) values per
byte, the low nibble first, and ``W_scales`` uint8 [E, rows, K / 32], one power-of-two scale per block
of 32 values (e8m0: 2^(s - 127)). An e2m1 nibble is a sign bit and a 3-bit magnitude code 0..7 for
0, 0.5, 1, 1.5, 2, 3, 4, 6. The checkpoint stores each expert bank as [E, out, in] (the blocks run
along the reduction dimension), while the model keeps it as [E, in, out], so the dequantized weight
is transposed on its last two dimensions. Modules named in ``modules_to_not_convert`` (attention,
router, embeddings, lm_head) are stored in bf16 and pass through unchanged.

:func:`dequantize_mxfp4` wraps a safetensors stream: each ``…_blocks`` is paired with its
``…_scales`` (in any order, across shards) and comes out as the plain ``…`` weight in the model's
dtype; an unpaired or mis-shaped tensor is a ``WeightsError`` naming it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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


def dequantize_mxfp4_tensor(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                            name: str = "weight") -> torch.Tensor:
    """``blocks`` uint8 [..., rows, G, 16] and ``scales`` uint8 [..., rows, G] → [..., G·32, rows] in ``dtype``
    (the checkpoint's [out, in] per expert turned to the model's [in, out])."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise WeightsError(f"{name}: MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise WeightsError(f"{name}{BLOCKS_SUFFIX} {tuple(blocks.shape)} and {name}{SCALES_SUFFIX} "
                           f"{tuple(scales.shape)} do not form MXFP4 blocks ([..., G, {BLOCK // 2}] bytes with one "
                           f"scale per block of {BLOCK} values)")
    table = e2m1_table().to(blocks.device)
    # Each byte gives two values, the low nibble first.
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], BLOCK).long()
    exponents = scales.to(torch.int32) - E8M0_BIAS
    values = torch.ldexp(table[codes], exponents[..., None].float())  # exact: a power-of-two scale
    weight = values.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)  # [..., rows, K]
    return weight.transpose(-1, -2).to(dtype).contiguous()


def dequantize_mxfp4(weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream with every ``X_blocks`` / ``X_scales`` pair replaced by the dequantized ``X``; other tensors
    pass through."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        for suffix in (BLOCKS_SUFFIX, SCALES_SUFFIX):
            if name.endswith(suffix):
                base = name[: -len(suffix)]
                parts = pending.setdefault(base, {})
                if suffix in parts:
                    raise WeightsError(f"{name} appears twice in the checkpoint")
                parts[suffix] = tensor
                if len(parts) == 2:
                    del pending[base]
                    yield base, dequantize_mxfp4_tensor(parts[BLOCKS_SUFFIX], parts[SCALES_SUFFIX], dtype, base)
                break
        else:
            yield name, tensor
    if pending:
        missing = [base + (SCALES_SUFFIX if BLOCKS_SUFFIX in parts else BLOCKS_SUFFIX)
                   for base, parts in sorted(pending.items())]
        raise WeightsError(f"MXFP4 checkpoint: {len(missing)} tensor(s) missing their pair: {', '.join(missing)} "
                           "(each weight is stored as <name>_blocks with <name>_scales); the checkpoint is incomplete")
