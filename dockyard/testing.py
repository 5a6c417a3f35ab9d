"""Numerical helpers shared by the test suite, the benchmarks and the onboarding checks.

:func:`rel_rmse` is the error metric every comparison against a reference uses;
:func:`paged_logits` drives a loaded model through the paged KV cache chunk by chunk without
an engine, so a model's cached path can be compared with a full recompute. Nothing here
depends on pytest: onboarding runs these checks on a user's machine.
"""

from __future__ import annotations

import torch
from torch import nn

from dockyard.ops import fp8_kv
from dockyard.ops.attention import Attention, AttentionMetadata, calibrate_kv_scales, forward_context


def rel_rmse(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """rmse(ours − ref) / rmse(ref), computed in float64."""
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def paged_logits(model: nn.Module, token_ids: list[int], chunks: list[int], block_size: int = 4,
                 num_blocks: int = 64, kv_cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits at every position of ``token_ids``, fed through the paged KV cache in ``chunks``.

    E.g. chunks=[10, 1, 1] prefills 10 tokens then decodes two single tokens with the cache. The
    model's own cache (if an engine bound one) is put back afterwards. ``kv_cache_dtype`` (default: the
    model's dtype) float8_e4m3fn runs an FP8 cache, its scales calibrated first where the layers have
    none from a checkpoint (as the engine does).
    """
    spec = model.spec
    attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    entries, heads, dim = spec.kv_cache_layout
    cache = torch.zeros(len(attn_layers), entries, num_blocks, block_size, heads, dim,
                        dtype=kv_cache_dtype or dtype, device=device)
    if fp8_kv.is_fp8(cache):
        calibrate_kv_scales(model, attn_layers)
    previous = [layer.kv_cache for layer in attn_layers]
    for i, layer in enumerate(attn_layers):
        layer.kv_cache = cache[i]
    # A scrambled block table checks that nothing assumes contiguous blocks.
    table = list(range(num_blocks))[::-1][: -(-len(token_ids) // block_size)]
    out, start = [], 0
    try:
        for n in chunks:
            end = start + n
            meta = AttentionMetadata(
                slot_mapping=torch.tensor([table[p // block_size] * block_size + p % block_size
                                           for p in range(start, end)], device=device),
                block_tables=torch.tensor([table], device=device), query_lens=[n], seq_lens=[end],
                block_size=block_size, seq_lens_tensor=torch.tensor([end], device=device),
            )
            with torch.no_grad(), forward_context(meta):
                hidden = model(torch.tensor(token_ids[start:end], device=device),
                               torch.arange(start, end, device=device))
                out.append(model.compute_logits(hidden))
            start = end
    finally:
        for layer, kv in zip(attn_layers, previous):
            layer.kv_cache = kv
    return torch.cat(out)
