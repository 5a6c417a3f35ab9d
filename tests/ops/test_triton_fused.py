"""The fused Triton kernels (RMSNorm with residual, SiLU-and-mul, rotary in place) against the
reference ops; on a machine without CUDA they run in Triton's interpreter at small sizes."""

from __future__ import annotations

import pytest
import torch

from dockyard.ops import activation, attention, norm, rotary
from dockyard.ops.dispatch import FUSED_ENV, fused_ops_enabled
from dockyard.spec import RopeSpec
from tests.helpers import import_kernels

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = DEVICE.type == "cpu"


tf = import_kernels("dockyard.ops.triton_fused", INTERPRET)


@pytest.fixture
def fused(monkeypatch):
    """The ops dispatch to the kernels (on the CPU: interpreter on, DOCKYARD_FUSED_OPS=1)."""
    monkeypatch.setenv(FUSED_ENV, "1")
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def reference(monkeypatch, fn):
    monkeypatch.setenv(FUSED_ENV, "0")
    try:
        return fn()
    finally:
        monkeypatch.setenv(FUSED_ENV, "1")


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """float32: equal to rounding. bfloat16 on the GPU: the same bits but for rounding flips in under
    1% of the elements; in the interpreter (which truncates where the GPU rounds to nearest) within
    two units of bfloat16's last place."""
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
        return
    torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -6, atol=2 ** -6)
    if not INTERPRET:
        assert (a != b).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_plus", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(monkeypatch, fused, dtype, one_plus, with_residual):
    gen = torch.Generator().manual_seed(1)
    layer = norm.RMSNorm(96, 1e-5, one_plus=one_plus)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, generator=gen))
    layer = layer.to(DEVICE, dtype)
    x = (torch.randn(5, 96, generator=gen) * 3).to(DEVICE, dtype)
    residual = torch.randn(5, 96, generator=gen).to(DEVICE, dtype) if with_residual else None
    assert fused_ops_enabled(x)
    got = layer(x, residual)
    want = reference(monkeypatch, lambda: layer(x, residual))
    if with_residual:
        close(got[0], want[0], dtype)
        close(got[1], want[1], dtype)  # the residual sum: one rounding in both
    else:
        close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_on_halves_of_a_fused_projection(monkeypatch, fused, dtype):
    gate_up = torch.randn(7, 2 * 200, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype) * 4
    gate, up = gate_up.split(200, dim=-1)  # strided rows, as the MLP passes them
    got = activation.act_and_mul(gate, up)
    close(got, reference(monkeypatch, lambda: activation.act_and_mul(gate, up)), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [64, 32])  # full and partial rotary
def test_rotary_in_place(monkeypatch, fused, dtype, rotary_dim):
    rope = RopeSpec(rope_type="llama3", theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)
    emb = rotary.get_rope(rope, 64, 256, rotary_dim)
    assert emb.reserve(256)
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(6, (4 + 2 + 2) * 64, generator=gen).to(DEVICE, dtype)
    positions = torch.tensor([0, 3, 17, 64, 200, 255], device=DEVICE)

    def run():
        q, k, _ = qkv.clone().split([4 * 64, 2 * 64, 2 * 64], dim=-1)  # strided views, as the layer has them
        return emb(positions, q.reshape(6, 4, 64), k.reshape(6, 2, 64))

    got, want = run(), reference(monkeypatch, run)
    for a, b in zip(got, want):
        close(a, b, dtype)
        assert torch.equal(a[..., rotary_dim:], b[..., rotary_dim:])  # the unrotated part untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [64, 32])  # full and partial rotary
def test_attention_rotates_and_writes_the_cache_in_one_kernel(monkeypatch, fused, dtype, rotary_dim):
    """The attention op given the rotary: on the fused path one kernel rotates q and k and stores k and v
    at their slots; the output and the whole KV cache equal the reference path's (reference rotary,
    then index_copy into the cache)."""
    rope = RopeSpec(rope_type="default", theta=10000.0)
    emb = rotary.get_rope(rope, 64, 256, rotary_dim)
    assert emb.reserve(256)
    gen = torch.Generator().manual_seed(5)
    blocks, block_size = 6, 4
    qkv = torch.randn(6, (4 + 2 + 2) * 64, generator=gen).to(DEVICE, dtype)
    # Two sequences: a prompt of 5 tokens and one decode at position 9 (its context already cached).
    positions = torch.tensor([0, 1, 2, 3, 4, 9], device=DEVICE)
    slots = torch.tensor([8, 9, 10, 11, 12, 21], device=DEVICE)
    cache0 = torch.randn(1, 2, blocks, block_size, 2, 64, generator=gen).to(DEVICE, dtype)
    metadata = attention.AttentionMetadata(
        slot_mapping=slots, block_tables=torch.tensor([[2, 3, 0], [4, 5, 1]], device=DEVICE),
        query_lens=[5, 1], seq_lens=[5, 10], block_size=block_size,
        seq_lens_tensor=torch.tensor([5, 10], device=DEVICE))

    def run():
        layer = attention.Attention(4, 64, 2, 0.125)
        layer.kv_cache = cache0[0].clone()
        q, k, v = qkv.clone().split([4 * 64, 2 * 64, 2 * 64], dim=-1)
        q, k, v = q.reshape(6, 4, 64), k.reshape(6, 2, 64), v.reshape(6, 2, 64)
        with attention.forward_context(metadata):
            out = layer(q, k, v, rotary=emb, positions=positions)
        return out, layer.kv_cache

    got, want = run(), reference(monkeypatch, run)
    assert emb.fused_tables(qkv) is not None
    for a, b in zip(got, want):  # the attention output and the whole cache
        close(a, b, dtype)


def test_cpu_keeps_the_reference_unless_asked(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.delenv(FUSED_ENV, raising=False)
    assert not fused_ops_enabled(x)
    monkeypatch.setenv(FUSED_ENV, "0")
    assert not fused_ops_enabled(x.to(DEVICE))
