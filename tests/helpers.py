"""Shared test helpers: error metric, paged single-sequence driver, tiny HF reference models."""

from __future__ import annotations

from pathlib import Path

import torch

from dockyard.ops.attention import AttentionMetadata, forward_context


def rel_rmse(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """rmse(ours − ref) / rmse(ref), computed in float64."""
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def paged_logits(model: torch.nn.Module, token_ids: list[int], chunks: list[int], block_size: int = 4,
                 num_blocks: int = 64) -> torch.Tensor:
    """Logits at every position of ``token_ids``, fed through the paged KV cache in ``chunks``.

    E.g. chunks=[10, 1, 1] prefills 10 tokens then decodes two single tokens with the cache.
    """
    spec = model.spec
    attn_layers = [m for m in model.modules() if type(m).__name__ == "Attention"]
    dtype = next(model.parameters()).dtype
    cache = torch.zeros(len(attn_layers), 2, num_blocks, block_size, spec.num_key_value_heads, spec.head_dim,
                        dtype=dtype)
    previous = [layer.kv_cache for layer in attn_layers]  # the engine's own cache, put back after
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
                                           for p in range(start, end)]),
                block_tables=torch.tensor([table]), query_lens=[n], seq_lens=[end], block_size=block_size,
            )
            with torch.no_grad(), forward_context(meta):
                hidden = model(torch.tensor(token_ids[start:end]), torch.arange(start, end))
                out.append(model.compute_logits(hidden))
            start = end
    finally:
        for layer, kv in zip(attn_layers, previous):
            layer.kv_cache = kv
    return torch.cat(out)


def save_tiny_hf_model(hf_model: torch.nn.Module, directory: Path) -> Path:
    """Save an HF model (config + safetensors) so dockyard loads it through its own loader."""
    hf_model.save_pretrained(directory, safe_serialization=True)
    return directory
