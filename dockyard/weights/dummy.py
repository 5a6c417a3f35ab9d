"""Dummy weights: deterministic seeded random tensors at the model's true shapes.

Each tensor's values depend only on (seed, name), never on iteration order. Matrices (linear
and embedding) get std 1/sqrt(last dim) so activations keep their scale layer after layer; norm weights are 1
and biases 0, so a model with dummy weights produces finite logits at any depth.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch
from torch import nn


def _dummy_tensor(name: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # norm weights
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return (torch.randn(shape, generator=gen) * shape[-1] ** -0.5).to(dtype)


def iter_dummy(model: nn.Module, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield a dummy tensor for every parameter of ``model`` under its own name."""
    for name, param in model.named_parameters():
        yield name, _dummy_tensor(name, param.shape, param.dtype, seed)
