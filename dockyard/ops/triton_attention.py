"""Paged decode attention as Triton kernels: the fast backend behind :func:`ops.attention.paged_attention`
and MLA's absorbed decode.

One query token per sequence attends to its whole cached context, read through the block table
from the paged KV cache ``[2, num_blocks, block_size, num_kv_heads, head_dim]``. The kernel:

- is GQA-aware: one program owns one (sequence, KV head) pair and all the query heads that share
  that KV head, so every K/V row is read from memory once for the group (the group is padded to
  16 rows so that the scores and the weighted sum are matrix products);
- keeps an online softmax in float32 (running max and sum, base-2 exponentials);
- splits long contexts ("split-K"): the context of a sequence is cut into ``num_splits`` equal
  token ranges, each handled by its own program, which writes a partial (max, sum, unnormalized
  output); a second small kernel combines the partials. With one split the first kernel writes
  the output directly;
- supports a sliding window, Gemma 2's logit soft-capping and gpt-oss's per-head sinks (a logit
  that joins the softmax denominator and attends to nothing), with the same semantics as
  :func:`ops.attention.softmax_attention`;
- reads an FP8 (e4m3) cache: the 1-byte tiles are loaded with the same 16-byte vector loads and
  converted to the product dtype in registers (exact: every e4m3 value is a bfloat16 / float16
  value); the key scale is folded into the score scale and the value scale into the output once per
  program (both per tensor, read from device scalars, :mod:`dockyard.ops.fp8_kv`), so a token costs
  one byte per element to read. The value tile is widened before it is staged for the tensor cores
  (:func:`_widen_in_registers`): the weighted sum reduces over tokens, across the tile's rows, and an
  8-bit tile read that way comes out of shared memory one byte per load, while a 16-bit one takes the
  transposing matrix load. Tile sizes come per cache element size from ``DECODE_TILES``.

:func:`paged_mla_decode_attention` is the same scheme for DeepSeek's multi-head latent attention in
its absorbed form (see :mod:`dockyard.ops.mla`): the cache ``[1, num_blocks, block_size, 1,
rank + rope]`` holds one latent per token that every head attends to (an MQA with one latent "KV
head"), queries arrive already multiplied into latent space, scores are ``q_latent · c_kv + q_pe ·
k_pe`` and the output accumulates ``p · c_kv``: the ``c_kv`` tile loaded for the scores is the value
tile too, so each cached latent is read once per block of heads. One program owns a block of 16
heads (the smallest tensor-core row count); the combine kernel sums the latent-wide output in
128-dim chunks.

Grid sizes come from tensor shapes only (batch, KV heads, width of the block table), never from
the contents of a tensor, so a call makes no host synchronization and can be captured in a CUDA
graph. ``TRITON_INTERPRET=1`` (set before this module is imported) runs the kernels on the CPU
through Triton's interpreter; the tests use it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from dockyard.ops.fp8_kv import is_fp8

# Fewest context tokens one split should own: below this, the extra partial writes and the
# reduction launch cost more than the parallelism gains.
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 128


# The kernels call only Triton builtins and the jit functions of this module, none of
# triton.language's own jit helpers (tl.max, tl.sum, tl.cdiv, tl.zeros): those are decorated when
# triton.language is first imported, so under TRITON_INTERPRET=1 set later (as a test does) they
# would not run in the interpreter, while this module's functions follow the setting at its import.
@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add_combine(a, b):
    return a + b


@triton.jit
def _split_range(lo, seq_len, split, num_splits, BLOCK_N: tl.constexpr):
    """Token range [start, end) of one split: equal shares of [lo, seq_len), each a whole number of
    BLOCK_N tiles; trailing splits may be empty."""
    per_split = (seq_len - lo + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = lo + split * chunk
    return start, tl.minimum(start + chunk, seq_len)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one tile of base-2 scores s [rows, BLOCK_N] and values v [BLOCK_N, D] into the running
    max, sum and unnormalized output."""
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.reduce(p, 1, _add_combine)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _widen_in_registers(x, DOT_DTYPE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``x`` [ROWS, COLS] converted to DOT_DTYPE where it was loaded, in registers.

    The split into even and odd columns and the join back leave every value in place; they are there
    because a plain conversion feeding ``tl.dot`` is moved by the compiler to after the tile's staging
    in shared memory, which for an 8-bit value tile (reduced along its rows) means byte-wide loads."""
    even, odd = tl.split(tl.reshape(x, [ROWS, COLS // 2, 2]))
    return tl.reshape(tl.join(even.to(DOT_DTYPE), odd.to(DOT_DTYPE)), [ROWS, COLS])


@triton.jit
def _store_result(acc, m_i, l_i, rows, row_ok, dims, dim_ok, b, split, num_splits,
                  out_ptr, stride_ob, stride_oh, part_acc_ptr, part_m_ptr, part_l_ptr,
                  NUM_ROWS: tl.constexpr, DIM: tl.constexpr, SPLIT: tl.constexpr):
    """Write a program's result: with splits the float32 partials [B, H, S] (max, sum) and
    [B, H, S, DIM] (unnormalized output) that the combine kernel reads, else the normalized output."""
    io_mask = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        part = (b * NUM_ROWS + rows) * num_splits + split
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None].to(tl.int64) * DIM + dims[None, :], acc, mask=io_mask)
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + rows[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, sinks_ptr, k_scale_ptr, v_scale_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    stride_qb, stride_qh,
    stride_cache_block, stride_cache_tok, stride_cache_head,
    stride_bt,
    stride_ob, stride_oh,
    scale, softcap, window,
    NUM_Q_HEADS: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_SINKS: tl.constexpr,
    SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_SCALED: tl.constexpr,
):
    """Program (b, kv_head, split): the group's queries over one token range of sequence b."""
    LOG2E: tl.constexpr = 1.4426950408889634
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    start, end = _split_range(lo, seq_len, split, num_splits, BLOCK_N)
    if KV_SCALED:  # FP8 cache: k = stored · k_scale, folded into the score scale
        scale = scale * tl.load(k_scale_ptr)

    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(DOT_DTYPE)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.full([GROUP_PAD], 0.0, dtype=tl.float32)
    if USE_SINKS and not SPLIT:
        # The sink is one more logit in the softmax, with a zero value row: start the running
        # max and sum from it. (With splits, the reduction adds it once.)
        m_i = tl.load(sinks_ptr + heads, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
        l_i = tl.full([GROUP_PAD], 1.0, dtype=tl.float32)
    acc = tl.full([GROUP_PAD, BLOCK_D], 0.0, dtype=tl.float32)

    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    head_off = kv_head * stride_cache_head
    for tile in range(start, end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < end
        block = tl.load(table + pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        row_off = block * stride_cache_block + (pos % PAGE_SIZE) * stride_cache_tok + head_off
        kv_mask = valid[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + row_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + row_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if KV_SCALED:
            v = _widen_in_registers(v, DOT_DTYPE, BLOCK_N, BLOCK_D)

        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION)  # [GROUP_PAD, BLOCK_N] fp32
        if USE_SOFTCAP:
            # softcap * tanh(s / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1) (exact limits at ±inf).
            x = s * (scale / softcap)
            s = softcap * (1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)) * LOG2E
        else:
            s = s * (scale * LOG2E)
        s = tl.where(valid[None, :], s, float("-inf"))

        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_DTYPE, DOT_PRECISION)

    if KV_SCALED:  # v = stored · v_scale: the weighted sum is linear in v
        acc = acc * tl.load(v_scale_ptr)
    _store_result(acc, m_i, l_i, heads, row_ok, dims, dim_ok, b, split, num_splits,
                  out_ptr, stride_ob, stride_oh, part_acc_ptr, part_m_ptr, part_l_ptr,
                  NUM_Q_HEADS, HEAD_DIM, SPLIT)


@triton.jit
def _combine_splits_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, sinks_ptr, out_ptr,
    num_splits, stride_ob, stride_oh,
    NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    USE_SINKS: tl.constexpr,
):
    """Program (b, q_head, dim chunk): softmax-weighted sum of the split partials (plus the sink's share).

    Each program combines ``BLOCK_D`` of the ``HEAD_DIM`` output dims, so a wide output (MLA's
    latent) is not held in registers whole for every split at once."""
    LOG2E: tl.constexpr = 1.4426950408889634
    b = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    dims = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    base = (b * NUM_Q_HEADS + head) * num_splits
    m = tl.load(part_m_ptr + base + splits, mask=split_ok, other=float("-inf"))
    l_s = tl.load(part_l_ptr + base + splits, mask=split_ok, other=0.0)
    m_max = tl.reduce(m, 0, _max_combine)
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * LOG2E
        m_max = tl.maximum(m_max, sink)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty (a padded row): output 0
    w = tl.exp2(m - m_max)  # empty splits: exp2(-inf) = 0
    denom = tl.reduce(w * l_s, 0, _add_combine)
    if USE_SINKS:
        denom += tl.exp2(sink - m_max)
    acc = tl.load(part_acc_ptr + (base + splits[:, None]).to(tl.int64) * HEAD_DIM + dims[None, :],
                  mask=split_ok[:, None] & dim_ok[None, :], other=0.0)
    out = tl.reduce(acc * w[:, None], 0, _add_combine) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dim_ok)


@triton.jit
def _mla_decode_kernel(
    q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    stride_qb, stride_qh,
    stride_cache_block, stride_cache_tok,
    stride_bt,
    stride_ob, stride_oh,
    scale,
    NUM_HEADS: tl.constexpr, HEAD_BLOCK: tl.constexpr,
    RANK: tl.constexpr, BLOCK_R: tl.constexpr, ROPE: tl.constexpr, BLOCK_P: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (b, head block, split): HEAD_BLOCK absorbed queries over one token range of sequence b.

    Scores are q_latent · c_kv + q_pe · k_pe; the output accumulates p · c_kv, in latent space: the
    latent tile loaded for the scores is the value tile too, so each cached row is read once."""
    LOG2E: tl.constexpr = 1.4426950408889634
    b = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    start, end = _split_range(0, seq_len, split, num_splits, BLOCK_N)

    heads = head_block * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)
    head_ok = heads < NUM_HEADS
    rank_dims = tl.arange(0, BLOCK_R)
    rank_ok = rank_dims < RANK
    rope_dims = tl.arange(0, BLOCK_P)
    rope_ok = rope_dims < ROPE
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q_latent = tl.load(q_rows + rank_dims[None, :], mask=head_ok[:, None] & rank_ok[None, :], other=0.0)
    q_pe = tl.load(q_rows + RANK + rope_dims[None, :], mask=head_ok[:, None] & rope_ok[None, :], other=0.0)
    q_latent = q_latent.to(DOT_DTYPE)
    q_pe = q_pe.to(DOT_DTYPE)

    m_i = tl.full([HEAD_BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.full([HEAD_BLOCK], 0.0, dtype=tl.float32)
    acc = tl.full([HEAD_BLOCK, BLOCK_R], 0.0, dtype=tl.float32)

    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    for tile in range(start, end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < end
        block = tl.load(table + pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        rows = cache_ptr + block * stride_cache_block + (pos % PAGE_SIZE) * stride_cache_tok
        c_kv = tl.load(rows[:, None] + rank_dims[None, :], mask=valid[:, None] & rank_ok[None, :], other=0.0)
        k_pe = tl.load(rows[:, None] + RANK + rope_dims[None, :], mask=valid[:, None] & rope_ok[None, :], other=0.0)
        c_kv = c_kv.to(DOT_DTYPE)

        s = tl.dot(q_latent, tl.trans(c_kv), input_precision=DOT_PRECISION)  # [HEAD_BLOCK, BLOCK_N] fp32
        s = tl.dot(q_pe, tl.trans(k_pe.to(DOT_DTYPE)), acc=s, input_precision=DOT_PRECISION)
        s = s * (scale * LOG2E)
        s = tl.where(valid[None, :], s, float("-inf"))

        m_i, l_i, acc = _online_softmax_step(s, c_kv, m_i, l_i, acc, DOT_DTYPE, DOT_PRECISION)

    _store_result(acc, m_i, l_i, heads, head_ok, rank_dims, rank_ok, b, split, num_splits,
                  out_ptr, stride_ob, stride_oh, part_acc_ptr, part_m_ptr, part_l_ptr,
                  NUM_HEADS, RANK, SPLIT)


_INTERPRETED = bool(triton.knobs.runtime.interpret)  # the kernels above were made for the interpreter
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``: a CUDA device, or any under ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    return device.type == "cuda" and torch.cuda.is_available()


def supports(head_dim: int, num_q_heads: int, num_kv_heads: int, dtype: torch.dtype) -> bool:
    """Whether :func:`paged_decode_attention` handles these attention shapes and query dtype."""
    return (16 <= head_dim <= 256 and num_kv_heads > 0 and num_q_heads % num_kv_heads == 0
            and dtype in _TL_DTYPES)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits are enough to exercise the reduction


def default_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per sequence, from shapes alone: none once (sequence, KV head) pairs fill every
    multiprocessor, else enough for about four programs per multiprocessor.

    ``max_context`` bounds the context (the block table's width × block size, or the sliding
    window); each split gets at least ``_MIN_TOKENS_PER_SPLIT`` tokens of it. (H100, bf16,
    Llama-3.1-8B shapes, benchmarks/RESULTS.md: at batch 64 one split was as fast as two at 32k
    tokens and 6% faster at 1k; splitting took batch 1 × 32k from 5% to 69% of the copy bandwidth
    and batch 8 × 8k from 38% to 78%.)
    """
    programs = max(1, batch * num_kv_heads)
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    wanted = -(-4 * sms // programs)
    useful = max(1, max_context // _MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, _MAX_SPLITS))


@functools.cache
def _fp32_dot_precision(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return "tf32x3"
    return "ieee"


def _dot_mode(q: torch.Tensor, dot_precision: str | None) -> tuple[torch.dtype, str | None]:
    """(operand dtype, float32 product mode) of the kernels' matrix products: q's dtype, except that
    Triton's interpreter multiplies bfloat16 operands as their raw bits, so there they are float32."""
    dot_dtype = torch.float32 if _INTERPRETED and q.dtype == torch.bfloat16 else q.dtype
    if dot_dtype == torch.float32:
        return dot_dtype, dot_precision or _fp32_dot_precision(q.device)
    return dot_dtype, None


# Decode kernel tiles by the cache's bytes per element: (BLOCK_N tokens, warps, pipeline stages) for heads
# of up to 128 dims (wider heads take half the tokens). The 1-byte (FP8) cache was swept on its own and keeps
# the same tile: twice the tokens per tile was no faster, its loop being bound by the instructions it issues per
# token, not by the bytes per tile. From the sweeps of benchmarks/attention_kernels.py and
# benchmarks/fp8_kv_cache.py (benchmarks/RESULTS.md); other sizes take the float32 entry.
DECODE_TILES: dict[int, tuple[int, int, int]] = {4: (64, 4, 3), 2: (64, 4, 3), 1: (64, 4, 3)}


def _default_tile(head_dim: int, element_size: int) -> tuple[int, int, int]:
    block_n, warps, stages = DECODE_TILES.get(element_size, DECODE_TILES[4])
    return (block_n if head_dim <= 128 else block_n // 2), warps, stages


def _split_partials(out: torch.Tensor, splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 workspace of a split-K launch writing ``out`` [B, H, D]: the unnormalized outputs
    [B, H, S, D], then the running maxes and sums [B, H, S], in one allocation. Without splits the
    kernel writes ``out`` directly and the three are placeholders."""
    if splits == 1:
        return out, out, out
    batch, heads, dim = out.shape
    partials = batch * heads * splits
    work = torch.empty(partials * (dim + 2), dtype=torch.float32, device=out.device)
    return work[: partials * dim], work[partials * dim:][:partials], work[-partials:]


def _launch_options(num_warps: int | None, num_stages: int | None) -> dict[str, int]:
    options = {}
    if num_warps is not None:
        options["num_warps"] = num_warps
    if num_stages is not None:
        options["num_stages"] = num_stages
    return options


# Output dims one combine program sums: a whole dense head, a quarter of DeepSeek's 512-dim latent.
_COMBINE_BLOCK_D = 128


def _combine_splits(part_acc: torch.Tensor, part_m: torch.Tensor, part_l: torch.Tensor, out: torch.Tensor,
                    splits: int, sinks: torch.Tensor | None = None) -> None:
    batch, heads, dim = out.shape
    block_d = min(_COMBINE_BLOCK_D, max(16, triton.next_power_of_2(dim)))
    _combine_splits_kernel[(batch, heads, triton.cdiv(dim, block_d))](
        part_acc, part_m, part_l, sinks if sinks is not None else out, out,
        splits, out.stride(0), out.stride(1),
        NUM_Q_HEADS=heads, HEAD_DIM=dim, BLOCK_D=block_d,
        BLOCK_S=max(2, triton.next_power_of_2(splits)), USE_SINKS=sinks is not None,
    )


def paged_decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    sliding_window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None, *,
    num_splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, dot_precision: str | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one query per sequence over its paged context → [B, Hq, D] in q's dtype.

    ``q`` [B, Hq, D]; ``kv_cache`` [2, num_blocks, block_size, Hkv, D] (any float dtype; converted
    to q's dtype on load, as the reference does; an FP8 cache needs ``k_scale`` and ``v_scale``,
    0-dim float32 tensors on the device, and is read as its values times them); ``block_tables``
    [B, max_blocks] (int32 or int64; entries past a sequence's last block are never read);
    ``seq_lens`` [B] context lengths on the device, including the token being decoded.
    ``sliding_window`` W: the query sees the last W keys. ``softcap``: scores s become softcap·tanh(s /
    softcap). ``sinks`` [Hq]: per-head logits that join the softmax denominator. The keyword-only
    arguments override the tuning defaults; ``dot_precision`` is Triton's mode for float32 products
    ("tf32x3", the default where the GPU has tf32, about float32's accuracy on the tensor cores; "ieee",
    exact, on the FMA units).
    """
    batch, num_q_heads, head_dim = q.shape
    entries, _, page_size, num_kv_heads, cache_dim = kv_cache.shape
    if entries != 2 or cache_dim != head_dim:
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} does not hold K and V of head_dim {head_dim}")
    if not supports(head_dim, num_q_heads, num_kv_heads, q.dtype):
        raise ValueError(f"unsupported: head_dim {head_dim}, {num_q_heads} q heads, {num_kv_heads} kv heads, {q.dtype}")
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("q and kv_cache need a contiguous last dimension")
    kv_scaled = is_fp8(kv_cache)
    if kv_scaled and (k_scale is None or v_scale is None):
        raise ValueError("an FP8 kv_cache needs k_scale and v_scale")
    out = torch.empty(batch, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    group = num_q_heads // num_kv_heads
    max_context = block_tables.shape[1] * page_size
    if sliding_window is not None:
        max_context = min(max_context, sliding_window)
    default_block_n, default_warps, default_stages = _default_tile(head_dim, kv_cache.element_size())
    block_n = block_n or default_block_n
    splits = num_splits or default_num_splits(batch, num_kv_heads, max_context, q.device)
    split = splits > 1
    dot_dtype, dot_precision = _dot_mode(q, dot_precision)
    part_acc, part_m, part_l = _split_partials(out, splits)
    options = _launch_options(num_warps or default_warps, num_stages or default_stages)
    _paged_decode_kernel[(batch, num_kv_heads, splits)](
        q, kv_cache[0], kv_cache[1], block_tables, seq_lens, sinks if sinks is not None else q,
        k_scale if kv_scaled else q, v_scale if kv_scaled else q,
        out, part_acc, part_m, part_l,
        q.stride(0), q.stride(1),
        kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        float(scale), float(softcap) if softcap is not None else 1.0,
        int(sliding_window) if sliding_window is not None else 0,
        NUM_Q_HEADS=num_q_heads,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PAGE_SIZE=page_size, BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None, USE_SOFTCAP=softcap is not None, USE_SINKS=sinks is not None,
        SPLIT=split, DOT_DTYPE=_TL_DTYPES[dot_dtype], DOT_PRECISION=dot_precision, KV_SCALED=kv_scaled,
        **options,
    )
    if split:
        _combine_splits(part_acc, part_m, part_l, out, splits, sinks)
    return out


# Query heads one MLA program holds: the smallest row count of a tensor-core product.
_MLA_HEAD_BLOCK = 16
_MLA_BLOCK_N = 32


def mla_supports(latent_dim: int, num_heads: int, dtype: torch.dtype) -> bool:
    """Whether :func:`paged_mla_decode_attention` handles a latent of ``latent_dim`` (rank + rope) values."""
    return 32 <= latent_dim <= 1024 and num_heads > 0 and dtype in _TL_DTYPES


def mla_num_splits(batch: int, num_heads: int, max_context: int, device: torch.device,
                   head_block: int = _MLA_HEAD_BLOCK) -> int:
    """Splits per sequence of the MLA kernel, from shapes alone (as :func:`default_num_splits`,
    counting one program per block of ``head_block`` heads)."""
    return default_num_splits(batch, -(-num_heads // head_block), max_context, device)


def paged_mla_decode_attention(
    q: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    scale: float, kv_lora_rank: int, *, num_splits: int | None = None, block_n: int | None = None,
    head_block: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    dot_precision: str | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode: one query per sequence over its paged latents → [B, H, kv_lora_rank] in q's dtype.

    ``q`` [B, H, kv_lora_rank + rope_dim]: each head's query already multiplied into latent space
    (``q_nope · W_UK``), then its rotated ``q_pe``. ``latent_cache`` [1, num_blocks, block_size, 1,
    kv_lora_rank + rope_dim] holds ``[c_kv, k_pe]`` per token. Scores are ``q · latent · scale``;
    the output is the softmax-weighted sum of the ``c_kv`` parts (the caller up-projects it with
    ``W_UV``). ``block_tables`` and ``seq_lens`` as in :func:`paged_decode_attention`; the
    keyword-only arguments override the tuning defaults.
    """
    batch, num_heads, latent_dim = q.shape
    entries, _, page_size, cache_heads, cache_dim = latent_cache.shape
    if entries != 1 or cache_heads != 1 or cache_dim != latent_dim:
        raise ValueError(f"latent_cache {tuple(latent_cache.shape)} does not hold one {latent_dim}-value latent "
                         "per token")
    rope_dim = latent_dim - kv_lora_rank
    if not mla_supports(latent_dim, num_heads, q.dtype) or kv_lora_rank < 16 or rope_dim < 1:
        raise ValueError(f"unsupported: kv_lora_rank {kv_lora_rank}, rope dims {rope_dim}, {num_heads} heads, "
                         f"{q.dtype}")
    if q.stride(-1) != 1 or latent_cache.stride(-1) != 1:
        raise ValueError("q and latent_cache need a contiguous last dimension")
    out = torch.empty(batch, num_heads, kv_lora_rank, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    head_block = head_block or _MLA_HEAD_BLOCK
    splits = num_splits or mla_num_splits(batch, num_heads, block_tables.shape[1] * page_size, q.device, head_block)
    dot_dtype, dot_precision = _dot_mode(q, dot_precision)
    part_acc, part_m, part_l = _split_partials(out, splits)
    _mla_decode_kernel[(batch, triton.cdiv(num_heads, head_block), splits)](
        q, latent_cache[0], block_tables, seq_lens,
        out, part_acc, part_m, part_l,
        q.stride(0), q.stride(1),
        latent_cache.stride(1), latent_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        float(scale),
        NUM_HEADS=num_heads, HEAD_BLOCK=head_block,
        RANK=kv_lora_rank, BLOCK_R=max(16, triton.next_power_of_2(kv_lora_rank)),
        ROPE=rope_dim, BLOCK_P=max(16, triton.next_power_of_2(rope_dim)),
        PAGE_SIZE=page_size, BLOCK_N=block_n or _MLA_BLOCK_N,
        SPLIT=splits > 1, DOT_DTYPE=_TL_DTYPES[dot_dtype], DOT_PRECISION=dot_precision,
        **_launch_options(num_warps, num_stages),
    )
    if splits > 1:
        _combine_splits(part_acc, part_m, part_l, out, splits)
    return out


def decode_kv_bytes(seq_lens: list[int], num_kv_heads: int, head_dim: int, element_size: int,
                    sliding_window: int | None = None) -> int:
    """Bytes of K and V a decode step must read: the floor of its memory traffic."""
    tokens = sum(min(n, sliding_window) if sliding_window else n for n in seq_lens)
    return 2 * tokens * num_kv_heads * head_dim * element_size


__all__ = ["DECODE_TILES", "default_num_splits", "decode_kv_bytes", "mla_num_splits", "mla_supports",
           "paged_decode_attention", "paged_mla_decode_attention", "supports", "triton_available"]
