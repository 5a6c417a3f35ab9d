"""Weights kept quantized in memory: the one description the loaders produce and the kernels read.

Two layouts, each independent of the checkpoint format it came from:

- :class:`Int4Weight`, 4-bit integers in groups along the input dimension (AWQ, GPTQ and
  compressed-tensors ``pack-quantized`` checkpoints are all converted to it on load). For output row
  ``n`` and stored column ``j`` (group ``g = j // group_size``) the real weight is
  ``(q[n, j] - zero[n, g]) * scale[n, g]`` and it multiplies input feature ``perm[j]`` (``j`` itself
  when there is no permutation; GPTQ's ``desc_act`` order is a permutation).
- :class:`GGUFBlocks`, a 2-D weight exactly as a GGUF file stores it: rows of llama.cpp blocks
  along the input dimension, with the block layout of its ``GGMLQuantizationType``; the ``gguf``
  package's ``gguf.quants.dequantize`` is the reference for its values.

:func:`dequantize_int4` is the plain PyTorch meaning of an :class:`Int4Weight` (what CPU loading
does with it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_SYMMETRIC_ZERO = 8  # the zero point of a symmetric int4 group: codes 0..15 mean -8..7


@dataclass
class Int4Weight:
    """A linear weight [out_features, in_features] as groups of 4-bit codes (see the module docstring).

    ``packed`` is uint8 [N, ceil(K / 2)]: the low nibble holds stored column ``2 i``, the high nibble
    column ``2 i + 1``. ``scales`` is [N, ceil(K / group_size)] in a floating dtype; ``zeros`` is
    uint8 of the same shape with values 0..15, or None for symmetric groups (zero point
    :data:`INT4_SYMMETRIC_ZERO`). ``perm`` is int64 [K] or None."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    in_features: int
    perm: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def nbytes(self) -> int:
        """Bytes this weight occupies in memory (what the memory plan counts)."""
        parts = [self.packed, self.scales] + [t for t in (self.zeros, self.perm) if t is not None]
        return sum(t.numel() * t.element_size() for t in parts)


@dataclass
class GGUFBlocks:
    """A 2-D weight in GGUF block layout: ``data`` is uint8 [N, bytes per row] as stored in the file,
    ``qtype`` a ``gguf.GGMLQuantizationType`` value, ``shape`` the logical (N, K)."""

    data: torch.Tensor
    qtype: int
    shape: tuple[int, int]

    def nbytes(self) -> int:
        return self.data.numel()


def unpack_int4_codes(weight: Int4Weight) -> torch.Tensor:
    """The codes of ``weight`` as int16 [N, K] in stored column order."""
    low = (weight.packed & 0x0F).to(torch.int16)
    high = (weight.packed >> 4).to(torch.int16)
    codes = torch.stack((low, high), dim=-1).reshape(weight.out_features, -1)
    return codes[:, : weight.in_features]


def dequantize_int4(weight: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The real weight [N, K] in input-feature order, computed in float32 and returned as ``dtype``."""
    codes = unpack_int4_codes(weight).to(torch.float32)
    groups = torch.arange(weight.in_features) // weight.group_size
    scales = weight.scales.to(torch.float32)[:, groups]
    zeros = (weight.zeros.to(torch.float32)[:, groups] if weight.zeros is not None
             else torch.full_like(codes, float(INT4_SYMMETRIC_ZERO)))
    stored = (codes - zeros) * scales
    if weight.perm is None:
        return stored.to(dtype)
    dense = torch.empty_like(stored)
    dense[:, weight.perm] = stored
    return dense.to(dtype)


__all__ = ["GGUFBlocks", "INT4_SYMMETRIC_ZERO", "Int4Weight", "dequantize_int4", "unpack_int4_codes"]
