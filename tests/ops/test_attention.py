"""Paged attention (reference backend) against a float64 attention written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dockyard.ops.attention import AttentionMetadata, paged_attention, write_kv_cache

HQ, HKV, D, BS = 6, 2, 16, 4


def naive(q, k, v, scale, window=None):
    """float64 softmax(q kᵀ) v for queries at the end of the context, causal (+ sliding window)."""
    q, k, v = q.double(), k.double(), v.double()
    lq, lk = q.shape[0], k.shape[0]
    out = torch.empty(lq, HQ, D, dtype=torch.float64)
    for t in range(lq):
        p = lk - lq + t
        for h in range(HQ):
            kh = h // (HQ // HKV)
            scores = []
            for j in range(lk):
                visible = j <= p and (window is None or j > p - window)
                scores.append(float(q[t, h] @ k[j, kh]) * scale if visible else -math.inf)
            w = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
            out[t, h] = w @ v[:, kh]
    return out


def build(seq_lens, query_lens, num_blocks=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = torch.zeros(2, num_blocks, BS, HKV, D)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, ks, vs, slots, qs = [], [], [], [], []
    for n, ql in zip(seq_lens, query_lens):
        nb = -(-n // BS)
        table = [perm.pop() for _ in range(nb)]
        tables.append(table)
        k = torch.randn(n, HKV, D, generator=gen)
        v = torch.randn(n, HKV, D, generator=gen)
        ks.append(k)
        vs.append(v)
        slot = torch.tensor([table[p // BS] * BS + p % BS for p in range(n)])
        write_kv_cache(k[: n - ql], v[: n - ql], cache, slot[: n - ql])  # the cached context
        slots.append(slot[n - ql:])
        qs.append(torch.randn(ql, HQ, D, generator=gen))
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        query_lens=list(query_lens), seq_lens=list(seq_lens), block_size=BS,
        seq_lens_tensor=torch.tensor(seq_lens),
    )
    new_k = torch.cat([k[n - ql:] for k, n, ql in zip(ks, seq_lens, query_lens)])
    new_v = torch.cat([v[n - ql:] for v, n, ql in zip(vs, seq_lens, query_lens)])
    write_kv_cache(new_k, new_v, cache, meta.slot_mapping)
    return cache, meta, qs, ks, vs


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(("seq_lens", "query_lens"), [
    ([9, 1, 14, 7], [1, 1, 1, 1]),  # decode-only batch (the batched path)
    ([9, 12, 6], [9, 3, 1]),  # prefill + chunked prefill + decode in one step
    ([9, 1, 14, 12, 6], [1, 1, 1, 12, 3]),  # decodes first (the scheduler's order), a whole prompt, a chunk
])
def test_paged_attention_matches_float64(seq_lens, query_lens, window):
    cache, meta, qs, ks, vs = build(seq_lens, query_lens)
    scale = D**-0.5
    out = paged_attention(torch.cat(qs), cache, meta, scale, window)
    ref = torch.cat([naive(q, k, v, scale, window) for q, k, v in zip(qs, ks, vs)])
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
