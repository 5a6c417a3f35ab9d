"""Dummy weights: deterministic seeded random tensors at the model's true shapes.

Each tensor's values depend only on (seed, name), never on iteration order. Matrices (linear
and embedding) get std 1/sqrt(last dim) so activations keep their scale layer after layer; norm weights are 1
and biases 0, so a model with dummy weights produces finite logits at any depth. MXFP4 expert blocks get the
bytes of such a random float tensor (random nibbles) and one scale per tensor of the same root-mean-square.

Large tensors are tiled from one seeded random pool of a prime number of values: filling a
70B model with ``randn`` takes minutes on a CPU, tiling runs at memory speed. Because the pool
length is prime and longer than any row, consecutive rows are distinct shifts of the pool. For a
model on a GPU the pool is drawn there (an MoE model has thousands of large expert tensors, and each
pool drawn on the CPU costs more than the tiling), so large tensors' values depend on (seed, name,
device type).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch
from torch import nn

from dockyard.ops.mxfp4_format import BLOCK as MXFP4_BLOCK
from dockyard.ops.mxfp4_format import SCALES_SUFFIX, scale_code_for_rms

# A prime: row r of a [rows, cols] tensor starts at offset r * cols mod POOL_SIZE, so rows differ.
POOL_SIZE = 1_048_573


def _dummy_tensor(name: str, shape: torch.Size, dtype: torch.dtype, seed: int,
                  device: torch.device | None = None) -> torch.Tensor:
    if dtype == torch.uint8:  # MXFP4 experts (ops.moe.GptOssExperts built as blocks): random nibbles, one scale
        if name.endswith(SCALES_SUFFIX):
            return torch.full(shape, scale_code_for_rms(shape[-1] * MXFP4_BLOCK), dtype=dtype)
        return _dummy_tensor(name, shape, torch.float32, seed, device).view(torch.uint8)[..., ::4].reshape(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) <= 1:  # norm weights (and scalar constants of the generic path's HF modules)
        return torch.ones(shape, dtype=dtype)
    name_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
    numel = shape.numel()
    if numel <= POOL_SIZE:
        gen = torch.Generator().manual_seed(name_seed)
        return (torch.randn(shape, generator=gen) * shape[-1] ** -0.5).to(dtype)
    device = device if device is not None and device.type == "cuda" else torch.device("cpu")
    gen = torch.Generator(device).manual_seed(name_seed)
    pool = (torch.randn(POOL_SIZE, generator=gen, device=device) * shape[-1] ** -0.5).to(dtype)
    return pool.repeat(-(-numel // POOL_SIZE))[:numel].view(shape)


def iter_dummy(model: nn.Module, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield a dummy tensor for every parameter of ``model`` under its own name.

    A tensor-parallel shard (``model.shard_plan``, see ``dockyard.distributed.sharding``) gets the
    full-shape tensor of each name, for the sharding loader to slice: every tensor-parallel size
    then runs the same model.
    """
    plan = getattr(model, "shard_plan", None)
    full_shapes = plan.full_shapes if plan is not None else {}
    for name, param in model.named_parameters():
        shape = torch.Size(full_shapes.get(name, param.shape))
        yield name, _dummy_tensor(name, shape, param.dtype, seed, param.device)
