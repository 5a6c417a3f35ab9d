"""The Triton paged decode kernel against the reference decode path.

On a machine without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set
while the kernel module is imported, since Triton decides at decoration time), at small sizes.
Skipped when Triton is not installed.
"""

from __future__ import annotations

import pytest
import torch

from dockyard.ops import attention
from dockyard.ops.attention import AttentionMetadata, _decode_attention, paged_attention
from tests.helpers import import_kernels, interpreter_loop_bounds_fix, rel_rmse

triton = pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = DEVICE.type == "cpu"
ta = import_kernels("dockyard.ops.triton_attention", INTERPRET)
BS = 16  # block size (tokens per KV block)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """Under the interpreter: TRITON_INTERPRET=1 for availability checks, and a numpy >= 2.4 fix for the
    kernel's context loop bounds (``helpers.interpreter_loop_bounds_fix``)."""
    if not INTERPRET:
        yield
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreter_loop_bounds_fix(monkeypatch)
    yield


def build(seq_lens, num_q_heads, num_kv_heads, head_dim, dtype=torch.float32, seed=0, extra_columns=2):
    """Random q and KV cache, each sequence's blocks scattered over a shuffled pool; padded block table."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // BS) for n in seq_lens]
    num_blocks = sum(needed) + 7
    cache = torch.randn(2, num_blocks, BS, num_kv_heads, head_dim, generator=gen).to(dtype)
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(needed) + extra_columns
    tables = []
    for nb in needed:
        row = [pool.pop() for _ in range(nb)]
        tables.append(row + [0] * (width - nb))
    q = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(seq_lens), dtype=torch.long), block_tables=torch.tensor(tables),
        query_lens=[1] * len(seq_lens), seq_lens=list(seq_lens), block_size=BS,
        seq_lens_tensor=torch.tensor(seq_lens),
    )
    return q, cache, meta


def reference(q, cache, meta, scale, window=None, softcap=None, sinks=None):
    """The reference decode path in float64 (float32 where softmax_attention upcasts for softcap/sinks)."""
    sinks = sinks.double() if sinks is not None else None
    return _decode_attention(q.double(), cache.double(), meta, scale, window, softcap, sinks)


def kernel(q, cache, meta, scale, window=None, softcap=None, sinks=None, **options):
    dev = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    out = ta.paged_decode_attention(dev(q), dev(cache), dev(meta.block_tables), dev(meta.seq_lens_tensor), scale,
                                    window, softcap, dev(sinks), **options)
    assert out.shape == q.shape and out.dtype == q.dtype
    return out.cpu()


SEQ_LENS = [1, 16, 45, 83]  # one token, a whole block, and lengths that end mid-block


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(2, 2), (8, 2), (8, 1)])  # GQA ratios 1, 4, 8
@pytest.mark.parametrize("num_splits", [1, 3])  # one pass, split-K (the default picks 1 at these sizes)
def test_matches_reference(num_q_heads, num_kv_heads, head_dim, num_splits):
    q, cache, meta = build(SEQ_LENS, num_q_heads, num_kv_heads, head_dim, seed=head_dim + num_q_heads)
    scale = head_dim**-0.5
    out = kernel(q, cache, meta, scale, num_splits=num_splits)
    torch.testing.assert_close(out.double(), reference(q, cache, meta, scale), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize(("window", "softcap", "with_sinks"), [
    (20, None, False),  # sliding window shorter than most contexts
    (200, None, False),  # window longer than every context
    (None, 2.0, False),  # soft-capping that bites (scores of a few units)
    (None, None, True),  # gpt-oss sinks
    (24, 3.0, True),  # everything at once
])
def test_window_softcap_sinks(window, softcap, with_sinks, num_splits):
    q, cache, meta = build(SEQ_LENS, 8, 2, 64, seed=7)
    q = q * 3  # sharper scores, so capping and sinks change the result visibly
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(3)) * 2 if with_sinks else None
    scale = 64**-0.5
    out = kernel(q, cache, meta, scale, window, softcap, sinks, num_splits=num_splits)
    ref = reference(q, cache, meta, scale, window, softcap, sinks)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    changed = (ref - reference(q, cache, meta, scale)).abs().max() > 1e-2
    assert changed == (window != 200)  # the feature under test did something (a window past every context: not)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, cache, meta = build(SEQ_LENS, 8, 2, 64, dtype=dtype, seed=11)
    sinks = torch.randn(8).to(dtype)
    for num_splits in (1, 3):
        out = kernel(q, cache, meta, 0.125, softcap=5.0, sinks=sinks, num_splits=num_splits)
        ref = reference(q, cache, meta, 0.125, softcap=5.0, sinks=sinks)
        err = (out.double() - ref).norm() / ref.norm()
        assert err < 1e-2, err


@pytest.mark.parametrize("num_splits", [1, 3])
def test_head_dim_not_a_power_of_two(num_splits):
    """head_dim 96 (Phi-3-mini): the dimension is padded to 128 inside the kernel and masked."""
    q, cache, meta = build(SEQ_LENS, 8, 2, 96, seed=19)
    out = kernel(q, cache, meta, 96**-0.5, num_splits=num_splits)
    torch.testing.assert_close(out.double(), reference(q, cache, meta, 96**-0.5), atol=1e-4, rtol=1e-4)


def test_int32_tables_padded_rows_and_empty_splits():
    """int32 indices; more splits than a short context fills; a padded row (length 0) gives zeros."""
    q, cache, meta = build([5, 70, 0, 18], 4, 1, 64, seed=5)
    meta.block_tables[2] = 0
    bt, lens = meta.block_tables.int(), meta.seq_lens_tensor.int()
    for splits in (1, 8):
        out = ta.paged_decode_attention(q.to(DEVICE), cache.to(DEVICE), bt.to(DEVICE), lens.to(DEVICE), 0.125,
                                        num_splits=splits).cpu()
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        keep = [0, 1, 3]
        sub = AttentionMetadata(meta.slot_mapping[keep], meta.block_tables[keep], [1] * 3,
                                [meta.seq_lens[i] for i in keep], BS, meta.seq_lens_tensor[keep])
        torch.testing.assert_close(out[keep].double(), reference(q[keep], cache, sub, 0.125), atol=1e-4, rtol=1e-4)


def test_strided_query():
    """q as a view into a fused qkv projection: rows further apart than Hq × D."""
    q, cache, meta = build(SEQ_LENS, 8, 2, 64, seed=13)
    fused = torch.randn(q.shape[0], 12, 64)
    fused[:, :8] = q
    view = fused[:, :8]
    assert not view.is_contiguous()
    torch.testing.assert_close(kernel(view, cache, meta, 0.125).double(), reference(q, cache, meta, 0.125),
                               atol=1e-4, rtol=1e-4)


def test_default_splits_from_shapes():
    device = torch.device("cpu")  # the interpreter's stand-in: 4 multiprocessors
    assert ta.default_num_splits(1, 1, 16, device) == 1  # short context: never split below 256 tokens
    assert ta.default_num_splits(1, 1, 8192, device) == 16  # 4 programs per multiprocessor
    assert ta.default_num_splits(64, 8, 32768, device) == 1  # the batch already fills the machine
    assert ta.decode_kv_bytes([10, 100], 2, 64, 2) == 2 * 110 * 2 * 64 * 2
    assert ta.decode_kv_bytes([10, 100], 2, 64, 2, sliding_window=20) == 2 * 30 * 2 * 64 * 2


def test_paged_attention_backend_switch(monkeypatch):
    """DOCKYARD_ATTENTION_BACKEND forces a backend; unset, the CPU keeps the reference path."""
    q, cache, meta = build(SEQ_LENS, 8, 2, 64, seed=17)
    q, cache = q.to(DEVICE), cache.to(DEVICE)
    meta = AttentionMetadata(meta.slot_mapping.to(DEVICE), meta.block_tables.to(DEVICE), meta.query_lens,
                             meta.seq_lens, BS, meta.seq_lens_tensor.to(DEVICE))
    monkeypatch.setenv(attention.BACKEND_ENV, "reference")
    assert attention.decode_backend(q, cache) == "reference"
    ref = paged_attention(q, cache, meta, 0.125, 30)
    monkeypatch.setenv(attention.BACKEND_ENV, "triton")
    assert attention.decode_backend(q, cache) == "triton"
    torch.testing.assert_close(paged_attention(q, cache, meta, 0.125, 30), ref, atol=1e-4, rtol=1e-4)
    # A batch of one decode goes to the kernel too.
    one = AttentionMetadata(meta.slot_mapping[:1], meta.block_tables[2:3], [1], meta.seq_lens[2:3], BS,
                            meta.seq_lens_tensor[2:3])
    torch.testing.assert_close(paged_attention(q[2:3], cache, one, 0.125, 30), ref[2:3], atol=1e-4, rtol=1e-4)

    monkeypatch.setenv(attention.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="expected reference, triton or auto"):
        paged_attention(q, cache, meta, 0.125)
    monkeypatch.delenv(attention.BACKEND_ENV)
    if DEVICE.type == "cpu":
        assert attention.decode_backend(q, cache) == "reference"
        monkeypatch.setenv(attention.BACKEND_ENV, "triton")
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="cannot run here"):
            paged_attention(q, cache, meta, 0.125)
    else:
        assert attention.decode_backend(q, cache) == "triton"


def test_mixed_batch_runs_its_leading_decodes_in_the_kernel(monkeypatch):
    """A step with decodes first (the scheduler's order), then a whole prompt and a prompt chunk after
    a cached prefix: the decodes go to the kernel in one call, the rest to the reference path."""
    gen = torch.Generator().manual_seed(23)
    seq_lens, query_lens = [40, 17, 83, 30, 50], [1, 1, 1, 30, 8]
    needed = [-(-n // BS) for n in seq_lens]
    cache = torch.randn(2, sum(needed) + 3, BS, 2, 64, generator=gen)
    pool = torch.randperm(cache.shape[1], generator=gen).tolist()
    width = max(needed)
    tables = [[pool.pop() for _ in range(nb)] for nb in needed]
    slots = [t[p // BS] * BS + p % BS for t, n, ql in zip(tables, seq_lens, query_lens) for p in range(n - ql, n)]
    meta = AttentionMetadata(torch.tensor(slots, device=DEVICE),
                             torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE),
                             query_lens, seq_lens, BS, torch.tensor(seq_lens, device=DEVICE))
    assert meta.num_leading_decodes == 3 and not meta.is_decode_only
    q, cache = torch.randn(sum(query_lens), 8, 64, generator=gen).to(DEVICE), cache.to(DEVICE)
    monkeypatch.setenv(attention.BACKEND_ENV, "reference")
    ref = paged_attention(q.double(), cache.double(), meta, 0.125)
    calls = []
    monkeypatch.setattr(ta, "paged_decode_attention",
                        lambda q, *args, **kwargs: calls.append(q.shape[0]) or KERNEL(q, *args, **kwargs))
    monkeypatch.setenv(attention.BACKEND_ENV, "triton")
    out = paged_attention(q, cache, meta, 0.125)
    assert calls == [3]
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


KERNEL = ta.paged_decode_attention


# Absorbed MLA decode (DeepSeek-V2/V3): the latent kernel against a float64 computation of the formula,
# and the MLA block's absorbed decode through the kernel against its expanded form.
RANK, ROPE = 32, 8


def mla_formula(q, cache, meta, scale, rank=RANK):
    """float64: softmax(q · latent · scale) over each context, times the contexts' c_kv parts."""
    rows = []
    for b, n in enumerate(meta.seq_lens):
        blocks = meta.block_tables[b, : -(-n // BS)]
        latent = cache[0, blocks].reshape(-1, cache.shape[-1])[:n].double()  # [n, rank + rope]
        probs = torch.softmax(q[b].double() @ latent.T * scale, dim=-1)  # [H, n]
        rows.append(probs @ latent[:, :rank])
    return torch.stack(rows)


@pytest.mark.parametrize(("num_heads", "rank", "rope"), [
    (4, RANK, ROPE),  # one head block, padded
    (20, 48, 16),  # two head blocks, the second ragged; a rank that is not a power of two
])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_mla_kernel_matches_formula(num_heads, rank, rope, num_splits):
    q, cache, meta = build(SEQ_LENS, num_heads, 1, rank + rope, seed=29 + num_heads)
    cache = cache[:1]  # one latent entry per token
    scale = 0.2
    out = ta.paged_mla_decode_attention(q.to(DEVICE), cache.to(DEVICE), meta.block_tables.to(DEVICE),
                                        meta.seq_lens_tensor.to(DEVICE), scale, rank, num_splits=num_splits,
                                        block_n=16).cpu()
    assert out.shape == (len(SEQ_LENS), num_heads, rank)
    torch.testing.assert_close(out.double(), mla_formula(q, cache, meta, scale, rank), atol=1e-4, rtol=1e-4)


def test_mla_kernel_bfloat16_and_padded_row():
    q, cache, meta = build([5, 70, 0, 18], 16, 1, RANK + ROPE, dtype=torch.bfloat16, seed=31)
    cache = cache[:1]
    meta.block_tables[2] = 0
    for splits in (1, 8):
        out = ta.paged_mla_decode_attention(q.to(DEVICE), cache.to(DEVICE), meta.block_tables.int().to(DEVICE),
                                            meta.seq_lens_tensor.int().to(DEVICE), 0.2, RANK,
                                            num_splits=splits).cpu()
        assert out.dtype == torch.bfloat16 and torch.equal(out[2], torch.zeros_like(out[2]))
        keep = [0, 1, 3]
        sub = AttentionMetadata(meta.slot_mapping[keep], meta.block_tables[keep], [1] * 3,
                                [meta.seq_lens[i] for i in keep], BS, meta.seq_lens_tensor[keep])
        ref = mla_formula(q[keep], cache, sub, 0.2)
        assert ((out[keep].double() - ref).norm() / ref.norm()) < 1e-2


def test_mla_kernel_rejects_bad_shapes():
    q, cache, meta = build([5], 4, 1, RANK + ROPE)
    args = (meta.block_tables.to(DEVICE), meta.seq_lens_tensor.to(DEVICE), 0.2)
    with pytest.raises(ValueError, match="does not hold one 40-value latent"):
        ta.paged_mla_decode_attention(q.to(DEVICE), cache.to(DEVICE), *args, RANK)  # K and V entries
    with pytest.raises(ValueError, match="kv_lora_rank 40, rope dims 0"):
        ta.paged_mla_decode_attention(q.to(DEVICE), cache[:1].to(DEVICE), *args, RANK + ROPE)


@pytest.mark.parametrize("case", ["v2-lite-yarn", "v3-qlora-yarn"])
def test_mla_block_absorbed_decode_in_kernel_matches_expanded(case, monkeypatch):
    """The MLA block over the paged cache: two prompts, then decode steps (one with a prompt chunk
    behind the decodes) in the absorbed form through the kernel vs every row in the expanded form."""
    from tests.ops.test_mla import CASES, HIDDEN, run_paged_steps
    from tests.ops.test_mla import build as build_mla

    model_type, q_rank, rope, extra = CASES[case]
    _, _, block, spec = build_mla(model_type, q_rank, rope, **extra)
    block = block.to(DEVICE)
    steps = [{"a": 21, "b": 6}, {"a": 1, "b": 1}, {"a": 1, "b": 5}, {"a": 1, "b": 1}]
    gen = torch.Generator().manual_seed(37)
    hidden = {k: torch.randn(sum(s.get(k, 0) for s in steps), HIDDEN, generator=gen) for k in ("a", "b")}
    calls = []
    monkeypatch.setattr(ta, "paged_mla_decode_attention",
                        lambda q, *args, **kwargs: calls.append(q.shape[0]) or MLA_KERNEL(q, *args, **kwargs))
    monkeypatch.setenv(attention.BACKEND_ENV, "triton")

    def run(absorb: bool) -> torch.Tensor:
        return run_paged_steps(block, spec, steps, hidden, absorb=absorb, device=DEVICE)

    expanded = run(absorb=False)
    assert calls == []
    absorbed = run(absorb=True)
    assert calls == [2, 1, 2]  # every decode row went to the kernel; the prompt chunk did not
    assert rel_rmse(absorbed, expanded) <= 1e-5


MLA_KERNEL = ta.paged_mla_decode_attention
