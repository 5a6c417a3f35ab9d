"""Triton matmuls on weights kept quantized: int4 groups (w4a16) and GGUF blocks, dequantized in-kernel.

``y = x @ W.T (+ bias)`` where ``W`` [N, K] is never materialized: each kernel reads the quantized bytes
of a [rows, columns] tile and turns them into float32 values in registers (``_weight_tile``), with the
meaning of :mod:`dockyard.ops.quant_format`:

- int4 (:class:`~dockyard.ops.quant_format.Int4Weight`): code ``q`` = nibble ``j % 2`` of byte ``j // 2``
  of the row, ``(q - zero) * scale`` of group ``j // group_size`` (zero 8 when the groups are symmetric);
  an act-order permutation is applied to ``x`` before the kernel (stored column ``j`` multiplies
  ``x[perm[j]]``), so the kernel always walks stored columns;
- GGUF (:class:`~dockyard.ops.quant_format.GGUFBlocks`): llama.cpp's block layouts Q4_0, Q5_0, Q8_0 (32
  values per block, one float16 scale; Q5_0's fifth bits in a 32-bit word) and the 256-value super-blocks
  Q4_K, Q5_K (6-bit sub-block scales and mins), Q6_K (int8 sub-block scales), as ``gguf.quants.dequantize``
  reads them. A row is a run of blocks; every float16 field sits at an even byte offset and is assembled from
  its two bytes.

Batch-1 (and up to :data:`GEMV_MAX_ROWS` rows) decode runs a streaming GEMV per layout family
(``_int4_gemv_kernel``, ``_gguf_gemv_kernel``): each program owns a few weight rows and walks K reading runs of
packed bytes (wide loads where the layout is aligned), turns codes into floats in registers by OR-ing them into
the mantissa of 2**23 (no int-to-float conversion), multiplies low nibbles with one half of x and high nibbles
with the other, and applies each group's or sub-block's scale (and zero point, through the sum of x) once to a
partial dot product rather than once per weight; float32 accumulation throughout. The per-element tile
(``_weight_tile``) serves the rest: a generic GEMV (:func:`quant_gemv_tiles`, odd int4 group sizes), a GEMM for
a few rows (tiles dequantized to the activation dtype, then ``tl.dot``), and a dequantizer (the weight written
out in the activation dtype) behind :func:`quant_linear`'s large-batch path, where cuBLAS on the dequantized
tile outruns an in-kernel dequantizing GEMM.

They run on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (set before this module is imported),
which is how the tests check them against ``gguf.quants.dequantize`` and ``quant_format.dequantize_int4``.
Triton's own jit helpers (``tl.sum``, ``tl.zeros``, ``tl.cdiv``) are decorated when triton.language is
imported, so under an interpreter switched on later they would not be interpreted; none is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dockyard.weights.gguf_metadata import KERNEL_BLOCK_TYPES

# The kernels' FORMAT: INT4, or a GGUF block type by its GGMLQuantizationType value.
INT4 = -1
Q4_0, Q5_0, Q8_0 = int(GGMLQuantizationType.Q4_0), int(GGMLQuantizationType.Q5_0), int(GGMLQuantizationType.Q8_0)
Q4_K, Q5_K, Q6_K = int(GGMLQuantizationType.Q4_K), int(GGMLQuantizationType.Q5_K), int(GGMLQuantizationType.Q6_K)
GGUF_FORMATS = tuple(sorted(int(q) for q in KERNEL_BLOCK_TYPES))  # the GGUF block types the kernels read


def gguf_block(qtype: int) -> tuple[int, int]:
    """(values, bytes) of one block of GGUF type ``qtype`` (the ``gguf`` package's table)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _u8(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _i8(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)


@triton.jit
def _f16(ptr, offs, mask):
    # A little-endian float16 at byte offset ``offs`` of a uint8 buffer.
    lo = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + offs + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _kquant_scale_min(ptr, base, j, mask):
    # The 6-bit scale and min of sub-block j (0..7) from the 12 scale bytes at ``base`` (llama.cpp's
    # get_scale_min_k4): sub-blocks 0-3 keep theirs in the low 6 bits of bytes j and j + 4; 4-7 take
    # 4 bits from byte j + 4 and their top 2 bits from the spare high bits of bytes j - 4 and j.
    low = j < 4
    b_j = _u8(ptr, base + j, mask)
    b_j4 = _u8(ptr, base + j + 4, mask)
    b_jm4 = _u8(ptr, base + tl.where(low, j, j - 4), mask)
    sc = tl.where(low, b_j & 63, (b_j4 & 15) | ((b_jm4 >> 6) << 4))
    mn = tl.where(low, b_j4 & 63, (b_j4 >> 4) | ((b_j >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, rows, cols, mask, stride_w, stride_s, stride_z,
                 FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """float32 weights of ``rows`` [R, 1] x ``cols`` [1, C] (stored column order); zero where masked."""
    row_bytes = rows.to(tl.int64) * stride_w
    if FORMAT == -1:  # INT4
        q = (_u8(w_ptr, row_bytes + cols // 2, mask) >> ((cols % 2) * 4)) & 15
        g = rows.to(tl.int64) * stride_s + cols // GROUP
        scale = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = _u8(z_ptr, rows.to(tl.int64) * stride_z + cols // GROUP, mask).to(tl.float32)
        else:
            zero = 8.0
        w = (q.to(tl.float32) - zero) * scale
    elif FORMAT == 2:  # Q4_0: float16 d, 16 bytes; value e is nibble e // 16 of byte e % 16, (q - 8) * d
        e = cols % 32
        base = row_bytes + (cols // 32) * 18
        q = (_u8(w_ptr, base + 2 + e % 16, mask) >> ((e // 16) * 4)) & 15
        w = (q.to(tl.float32) - 8.0) * _f16(w_ptr, base, mask)
    elif FORMAT == 6:  # Q5_0: float16 d, qh (bit e of 4 bytes), 16 bytes as Q4_0's; (q + 16 * bit - 16) * d
        e = cols % 32
        base = row_bytes + (cols // 32) * 22
        q = (_u8(w_ptr, base + 6 + e % 16, mask) >> ((e // 16) * 4)) & 15
        q |= ((_u8(w_ptr, base + 2 + e // 8, mask) >> (e % 8)) & 1) << 4
        w = (q.to(tl.float32) - 16.0) * _f16(w_ptr, base, mask)
    elif FORMAT == 8:  # Q8_0: float16 d, 32 int8; q * d
        base = row_bytes + (cols // 32) * 34
        w = _i8(w_ptr, base + 2 + cols % 32, mask) * _f16(w_ptr, base, mask)
    elif FORMAT == 14:  # Q6_K: ql[128], qh[64], int8 scales[16], float16 d
        e = cols % 256
        base = row_bytes + (cols // 256) * 210
        half = e // 128
        quarter = (e % 128) // 32
        lane = e % 32
        ql = _u8(w_ptr, base + half * 64 + (quarter % 2) * 32 + lane, mask) >> ((quarter // 2) * 4)
        qh = _u8(w_ptr, base + 128 + half * 32 + lane, mask) >> (quarter * 2)
        q = ((ql & 15) | ((qh & 3) << 4)) - 32
        w = q.to(tl.float32) * _i8(w_ptr, base + 192 + e // 16, mask) * _f16(w_ptr, base + 208, mask)
    else:  # Q4_K (12), Q5_K (13): float16 d, dmin, 12 scale bytes, [Q5_K: qh[32]], qs[128]; d*sc*q - dmin*m
        e = cols % 256
        j = e // 32
        if FORMAT == 12:
            base = row_bytes + (cols // 256) * 144
            qs = 16
        else:
            base = row_bytes + (cols // 256) * 176
            qs = 48
        q = (_u8(w_ptr, base + qs + (e // 64) * 32 + e % 32, mask) >> ((j % 2) * 4)) & 15
        if FORMAT == 13:
            q += ((_u8(w_ptr, base + 16 + e % 32, mask) >> j) & 1) << 4
        sc, mn = _kquant_scale_min(w_ptr, base + 4, j, mask)
        w = _f16(w_ptr, base, mask) * sc * q.to(tl.float32) - _f16(w_ptr, base + 2, mask) * mn
    return w


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, N, stride_w, stride_s, stride_z,
                 K: tl.constexpr, FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # K is a compile-time constant: the loop bound must be a Python int under the interpreter.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.full([BLOCK_N, BLOCK_K], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_ok = cols < K
        x = tl.load(x_ptr + cols, mask=k_ok, other=0.0).to(tl.float32)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, rows[:, None], cols[None, :], row_ok[:, None] & k_ok[None, :],
                         stride_w, stride_s, stride_z, FORMAT, GROUP, HAS_ZEROS)
        acc += w * x[None, :]
    y = tl.reduce(acc, 1, _add)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, M, N, stride_xm, stride_ym,
                 stride_w, stride_s, stride_z,
                 K: tl.constexpr, FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_F32: tl.constexpr):
    # DOT_F32: multiply in float32 (the interpreter's dot on bfloat16 operands made in registers is wrong).
    # Row tiles vary fastest, so the programs that share a weight tile run together (it is read from L2).
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    pid_m = tl.program_id(0) % tiles_m
    pid_n = tl.program_id(0) // tiles_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_ok = cols < K
        a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + cols[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, offs_n[:, None], cols[None, :], n_ok[:, None] & k_ok[None, :],
                         stride_w, stride_s, stride_z, FORMAT, GROUP, HAS_ZEROS)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(w.to(a.dtype)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_w, stride_s, stride_z,
                       FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    w = _weight_tile(w_ptr, s_ptr, z_ptr, rows[:, None], cols[None, :], mask, stride_w, stride_s, stride_z,
                     FORMAT, GROUP, HAS_ZEROS)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Streaming GEMV for a few rows (decode): one kernel per layout family, each reading its packed bytes
# as contiguous runs, decoding nibbles and bit-planes in registers, and applying every scale once per group
# or sub-block to a partial dot product instead of once per weight.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _code_f32(q, offset: tl.constexpr):
    # ``q - offset`` in float32 for a small non-negative integer q: OR-ing q into the mantissa of 2**23 gives
    # the float 2**23 + q exactly, one integer op and one subtraction instead of an int-to-float conversion
    # (a quarter-rate instruction that would bound a 4-bit GEMV below the memory bandwidth).
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + offset)


@triton.jit
def _superblock_parts(row_off, row_ok, blk, BLOCKS: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    # For the K-quant tiles' parts [P] (each in super-block ``blk``): the block, whether it exists, the byte
    # offsets [N, P] of its super-block in every row, and the mask [N, P].
    p_ok = blk < BLOCKS
    return blk, p_ok, row_off[:, None] + (blk * BLOCK_BYTES)[None, :], row_ok[:, None] & p_ok[None, :]


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, N, stride_xm, stride_ym, stride_w, stride_s,
                      stride_z, K: tl.constexpr, GROUP: tl.constexpr, SUB: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, SUBS: tl.constexpr, EVEN: tl.constexpr):
    # Each iteration reads SUBS runs of SUB // 2 packed bytes per row (SUB columns inside one group): the low
    # nibbles multiply the even columns of x, the high nibbles the odd ones (x read contiguously and split);
    # the zero point is folded into the run's sum of x, and the group's scale multiplies the run's dot product.
    # EVEN: N a multiple of BLOCK_N and K of SUB * SUBS, so the weight loads need no mask (wide vector loads).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_row = x_ptr + tl.program_id(1).to(tl.int64) * stride_xm
    run = tl.arange(0, SUBS)
    col = tl.arange(0, SUB)
    byte = tl.arange(0, SUB // 2)
    w_rows = w_ptr + rows.to(tl.int64) * stride_w
    acc = tl.full([BLOCK_N, SUBS], 0.0, tl.float32)
    for k0 in range(0, K, SUB * SUBS):
        start = k0 + run * SUB  # [S] first column of each run
        x_cols = start[:, None] + col[None, :]  # [S, SUB]
        x = tl.load(x_row + x_cols, mask=x_cols < K, other=0.0).to(tl.float32)
        xe, xo = tl.split(tl.reshape(x, [SUBS, SUB // 2, 2]))
        w_at = w_rows[:, None, None] + (k0 // 2 + run[:, None] * (SUB // 2) + byte[None, :])[None, :, :]
        if EVEN:
            q = tl.load(w_at).to(tl.int32)
        else:
            q = tl.load(w_at, mask=row_ok[:, None, None] & ((start[:, None] + 2 * byte[None, :]) < K)[None, :, :],
                        other=0).to(tl.int32)
        prod = _code_f32(q & 15, 8.0) * xe[None, :, :] + _code_f32(q >> 4, 8.0) * xo[None, :, :]
        dot = tl.reduce(prod, 2, _add)  # [N, S]
        run_ok = row_ok[:, None] & (start < K)[None, :]
        group = (start // GROUP)[None, :]
        scale = tl.load(s_ptr + rows[:, None].to(tl.int64) * stride_s + group, mask=run_ok, other=0.0)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_z + group, mask=run_ok, other=8)
            dot -= (zero.to(tl.float32) - 8.0) * tl.reduce(xe + xo, 1, _add)[None, :]
        acc += scale.to(tl.float32) * dot
    y = tl.reduce(acc, 1, _add)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + tl.program_id(1).to(tl.int64) * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gguf_gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, N, stride_xm, stride_ym, stride_w,
                      BLOCKS: tl.constexpr, BLOCK_BYTES: tl.constexpr, FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BPI: tl.constexpr):
    # BLOCKS blocks per row, BPI of them per iteration. Each format's tile puts the bytes that share one
    # scale (a 32-value block, a K-quant sub-block pair or a Q6_K 16-value scale run) along the last axis.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_row = x_ptr + tl.program_id(1).to(tl.int64) * stride_xm
    row_off = rows.to(tl.int64) * stride_w
    if FORMAT == 2 or FORMAT == 6 or FORMAT == 8:  # Q4_0 (d, 16 nibble bytes), Q5_0 (d, qh, 16), Q8_0 (d, 32 int8)
        # The scale multiplies each product in place: these rows are only 2-byte aligned, so a block's bytes
        # spread over many threads and a per-block sum would cost shuffles; one sum at the end instead.
        if FORMAT == 8:
            lane = tl.arange(0, 32)
        else:
            lane = tl.arange(0, 16)
        acc3 = tl.full([BLOCK_N, BPI, lane.shape[0]], 0.0, tl.float32)
        for b0 in range(0, BLOCKS, BPI):
            blk = b0 + tl.arange(0, BPI)
            blk_ok = blk < BLOCKS
            off = row_off[:, None] + blk[None, :] * BLOCK_BYTES  # [N, B]
            ok = row_ok[:, None] & blk_ok[None, :]
            q = _u8(w_ptr, off[:, :, None] + BLOCK_BYTES - lane.shape[0] + lane[None, None, :], ok[:, :, None])
            x_lo = tl.load(x_row + blk[:, None] * 32 + lane[None, :], mask=blk_ok[:, None], other=0.0).to(tl.float32)
            if FORMAT == 2:  # value e is nibble e // 16 of byte e % 16, (q - 8) * d
                x_hi = tl.load(x_row + blk[:, None] * 32 + 16 + lane[None, :], mask=blk_ok[:, None],
                               other=0.0).to(tl.float32)
                prod = _code_f32(q & 15, 8.0) * x_lo[None, :, :] + _code_f32(q >> 4, 8.0) * x_hi[None, :, :]
            elif FORMAT == 6:  # as Q4_0 with bit e of the little-endian word at byte 2 as the fifth bit, minus 16
                x_hi = tl.load(x_row + blk[:, None] * 32 + 16 + lane[None, :], mask=blk_ok[:, None],
                               other=0.0).to(tl.float32)
                qh = (_u8(w_ptr, off + 2, ok) | (_u8(w_ptr, off + 3, ok) << 8) | (_u8(w_ptr, off + 4, ok) << 16)
                      | (_u8(w_ptr, off + 5, ok) << 24))[:, :, None]
                q_lo = (q & 15) | (((qh >> lane[None, None, :]) & 1) << 4)
                q_hi = (q >> 4) | (((qh >> (lane[None, None, :] + 16)) & 1) << 4)
                prod = _code_f32(q_lo, 16.0) * x_lo[None, :, :] + _code_f32(q_hi, 16.0) * x_hi[None, :, :]
            else:  # int8 as its byte XOR 128, offset by 128
                prod = _code_f32(q ^ 128, 128.0) * x_lo[None, :, :]
            acc3 += _f16(w_ptr, off, ok)[:, :, None] * prod
        acc = tl.reduce(acc3, 2, _add)
    elif FORMAT == 14:  # Q6_K: ql[128], qh[64], int8 scales[16], float16 d; pieces of 16 values share a scale
        t = tl.arange(0, 16)
        p = tl.arange(0, BPI * 4)  # (block, half h, lane-half lh) of the 32 lanes ql/qh bytes are laid out in
        h = (p // 2) % 2
        lane = (p % 2)[:, None] * 16 + t[None, :]  # [P, 16]
        acc3 = tl.full([BLOCK_N, BPI * 4, 16], 0.0, tl.float32)
        for b0 in range(0, BLOCKS, BPI):
            blk, p_ok, off, ok = _superblock_parts(row_off, row_ok, b0 + p // 4, BLOCKS, BLOCK_BYTES)
            ok3 = ok[:, :, None]
            byte = (h[:, None] * 64 + lane)[None, :, :]
            ql_a = _u8(w_ptr, off[:, :, None] + byte, ok3)  # quarters 0 (low nibble) and 2 (high)
            ql_b = _u8(w_ptr, off[:, :, None] + byte + 32, ok3)  # quarters 1 and 3
            qh = _u8(w_ptr, off[:, :, None] + 128 + (h[:, None] * 32 + lane)[None, :, :], ok3)
            x_at = x_row + (blk * 256 + h * 128)[:, None] + lane  # [P, 16], quarter 0
            sc_at = off + 192 + (h * 8 + p % 2)[None, :]  # scale of quarter 0 (16-value pieces: e // 16)
            d = _f16(w_ptr, off + 208, ok)
            for quarter in tl.static_range(4):
                if quarter % 2 == 0:
                    ql = ql_a
                else:
                    ql = ql_b
                if quarter < 2:
                    ql = ql & 15
                else:
                    ql = ql >> 4
                q = ql | (((qh >> (2 * quarter)) & 3) << 4)
                xq = tl.load(x_at + quarter * 32, mask=p_ok[:, None], other=0.0).to(tl.float32)
                scale = d * _i8(w_ptr, sc_at + quarter * 2, ok)
                acc3 += (_code_f32(q, 32.0) * scale[:, :, None]) * xq[None, :, :]
        acc = tl.reduce(acc3, 2, _add)
    else:  # Q4_K (144 bytes), Q5_K (176): d, dmin, 12 scale bytes, [Q5_K: qh[32]], qs[128]; d*sc*q - dmin*m
        lane = tl.arange(0, 32)
        p = tl.arange(0, BPI * 4)  # (block, pair c of sub-blocks 2c and 2c + 1, which share 32 qs bytes)
        c = p % 4
        acc = tl.full([BLOCK_N, BPI * 4], 0.0, tl.float32)
        for b0 in range(0, BLOCKS, BPI):
            blk, p_ok, off, ok = _superblock_parts(row_off, row_ok, b0 + p // 4, BLOCKS, BLOCK_BYTES)
            ok3 = ok[:, :, None]
            qs = _u8(w_ptr, off[:, :, None] + (BLOCK_BYTES - 128) + (c[:, None] * 32 + lane[None, :])[None], ok3)
            q_lo = qs & 15
            q_hi = qs >> 4
            if FORMAT == 13:
                qh = _u8(w_ptr, off[:, :, None] + 16 + lane[None, None, :], ok3) >> (2 * c)[None, :, None]
                q_lo = q_lo | ((qh & 1) << 4)
                q_hi = q_hi | ((qh & 2) << 3)
            x_at = x_row + (blk * 256 + c * 64)[:, None] + lane[None, :]  # [P, 32]
            x_lo = tl.load(x_at, mask=p_ok[:, None], other=0.0).to(tl.float32)
            x_hi = tl.load(x_at + 32, mask=p_ok[:, None], other=0.0).to(tl.float32)
            dot_lo = tl.reduce(_code_f32(q_lo, 0.0) * x_lo[None, :, :], 2, _add)
            dot_hi = tl.reduce(_code_f32(q_hi, 0.0) * x_hi[None, :, :], 2, _add)
            sc_lo, mn_lo = _kquant_scale_min(w_ptr, off + 4, (2 * c)[None, :], ok)
            sc_hi, mn_hi = _kquant_scale_min(w_ptr, off + 4, (2 * c + 1)[None, :], ok)
            x_sum_lo = tl.reduce(x_lo, 1, _add)[None, :]
            x_sum_hi = tl.reduce(x_hi, 1, _add)[None, :]
            acc += (_f16(w_ptr, off, ok) * (sc_lo * dot_lo + sc_hi * dot_hi)
                    - _f16(w_ptr, off + 2, ok) * (mn_lo * x_sum_lo + mn_hi * x_sum_hi))
    y = tl.reduce(acc, 1, _add)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + tl.program_id(1).to(tl.int64) * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _int4_dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, stride_w, stride_s, stride_z, K: tl.constexpr,
                            GROUP: tl.constexpr, SUB: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr,
                            SUBS: tl.constexpr):
    # The streaming GEMV's runs, written out: low and high nibbles interleaved back into column order.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    k0 = tl.program_id(1) * (SUB * SUBS)
    start = k0 + tl.arange(0, SUBS) * SUB
    even = start[:, None] + 2 * tl.arange(0, SUB // 2)[None, :]  # [S, B]
    q = tl.load(w_ptr + rows[:, None, None].to(tl.int64) * stride_w + (even // 2)[None, :, :],
                mask=row_ok[:, None, None] & (even < K)[None, :, :], other=0).to(tl.int32)
    run_ok = row_ok[:, None] & (start < K)[None, :]
    group = (start // GROUP)[None, :]
    scale = tl.load(s_ptr + rows[:, None].to(tl.int64) * stride_s + group, mask=run_ok, other=0.0).to(tl.float32)
    shift = tl.full([BLOCK_N, SUBS], 0.0, tl.float32)  # zero - 8
    if HAS_ZEROS:
        shift = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_z + group, mask=run_ok, other=8).to(tl.float32) - 8
    lo = (_code_f32(q & 15, 8.0) - shift[:, :, None]) * scale[:, :, None]
    hi = (_code_f32(q >> 4, 8.0) - shift[:, :, None]) * scale[:, :, None]
    w = tl.reshape(tl.join(lo, hi), [BLOCK_N, SUBS * SUB])
    cols = k0 + tl.arange(0, SUBS * SUB)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols < K)[None, :])


@triton.jit
def _gguf_dequantize_kernel(w_ptr, out_ptr, N, stride_w, stride_out, BLOCKS: tl.constexpr, BLOCK_BYTES: tl.constexpr,
                            FORMAT: tl.constexpr, BLOCK_N: tl.constexpr, BPI: tl.constexpr):
    # Q4_0 and Q4_K as the streaming GEMV reads them, each half of a byte run stored as a contiguous piece.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_off = rows.to(tl.int64) * stride_w
    out_rows = out_ptr + rows[:, None, None].to(tl.int64) * stride_out
    if FORMAT == 2:  # Q4_0: (q - 8) * d, low nibbles values 0-15 of the block, high ones 16-31
        lane = tl.arange(0, 16)
        blk = tl.program_id(1) * BPI + tl.arange(0, BPI)
        off = row_off[:, None] + blk[None, :] * BLOCK_BYTES
        ok = row_ok[:, None] & (blk < BLOCKS)[None, :]
        q = _u8(w_ptr, off[:, :, None] + 2 + lane[None, None, :], ok[:, :, None])
        d = _f16(w_ptr, off, ok)[:, :, None]
        at = out_rows + (blk[:, None] * 32 + lane[None, :])[None, :, :]
        tl.store(at, (_code_f32(q & 15, 8.0) * d).to(out_ptr.dtype.element_ty), mask=ok[:, :, None])
        tl.store(at + 16, (_code_f32(q >> 4, 8.0) * d).to(out_ptr.dtype.element_ty), mask=ok[:, :, None])
    else:  # Q4_K: d * sc * q - dmin * m per 32-value sub-block; pair c's low nibbles are sub-block 2c
        lane = tl.arange(0, 32)
        p = tl.arange(0, BPI * 4)
        c = p % 4
        blk, p_ok, off, ok = _superblock_parts(row_off, row_ok, tl.program_id(1) * BPI + p // 4, BLOCKS,
                                               BLOCK_BYTES)
        qs = _u8(w_ptr, off[:, :, None] + 16 + (c[:, None] * 32 + lane[None, :])[None], ok[:, :, None])
        sc_lo, mn_lo = _kquant_scale_min(w_ptr, off + 4, (2 * c)[None, :], ok)
        sc_hi, mn_hi = _kquant_scale_min(w_ptr, off + 4, (2 * c + 1)[None, :], ok)
        d = _f16(w_ptr, off, ok)
        dmin = _f16(w_ptr, off + 2, ok)
        at = out_rows + ((blk * 256 + c * 64)[:, None] + lane[None, :])[None, :, :]
        lo = _code_f32(qs & 15, 0.0) * (d * sc_lo)[:, :, None] - (dmin * mn_lo)[:, :, None]
        hi = _code_f32(qs >> 4, 0.0) * (d * sc_hi)[:, :, None] - (dmin * mn_hi)[:, :, None]
        tl.store(at, lo.to(out_ptr.dtype.element_ty), mask=ok[:, :, None])
        tl.store(at + 32, hi.to(out_ptr.dtype.element_ty), mask=ok[:, :, None])


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
class QuantOperand:
    """The tensors one kernel call reads: ``data`` (uint8 rows: packed nibbles or GGUF blocks), int4's
    ``scales`` / ``zeros`` / ``group_size``, the ``format`` (:data:`INT4` or a GGUF type) and the logical
    ``shape`` (N, K)."""

    def __init__(self, data: torch.Tensor, fmt: int, shape: tuple[int, int], scales: torch.Tensor | None = None,
                 zeros: torch.Tensor | None = None, group_size: int = 0) -> None:
        if data.dtype != torch.uint8 or data.dim() != 2 or data.stride(1) != 1:
            raise ValueError(f"quantized weight data must be uint8 [N, bytes] with contiguous rows, got "
                             f"{data.dtype} {tuple(data.shape)}")
        if fmt != INT4 and fmt not in GGUF_FORMATS:
            raise ValueError(f"no kernel for weight format {fmt}; the kernels read int4 and GGUF "
                             + ", ".join(GGMLQuantizationType(f).name for f in GGUF_FORMATS))
        self.data, self.format, self.shape = data, fmt, (int(shape[0]), int(shape[1]))
        self.scales, self.zeros, self.group_size = scales, zeros, group_size
        if fmt != INT4 and self.shape[1] % gguf_block(fmt)[0]:
            raise ValueError(f"a GGUF {GGMLQuantizationType(fmt).name} row of {self.shape[1]} values is not a "
                             f"whole number of {gguf_block(fmt)[0]}-value blocks")

    def args(self) -> tuple:
        """(w_ptr, s_ptr, z_ptr) and their row strides, as the kernels take them."""
        s = self.scales if self.scales is not None else self.data
        z = self.zeros if self.zeros is not None else self.data
        return (self.data, s, z), (self.data.stride(0), s.stride(0), z.stride(0))

    def meta(self) -> dict:
        return {"FORMAT": self.format, "GROUP": max(self.group_size, 1), "HAS_ZEROS": self.zeros is not None}


# (BLOCK_N, BLOCK_K, num_warps) of the generic tile GEMV (:func:`quant_gemv_tiles`, int4 groups of odd size) and
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMM: starting points, `benchmarks/quant_matmul.py`
# times alternatives.
GEMV_CONFIG = (4, 256, 4)
GEMM_CONFIG = (16, 64, 64, 4, 3)
# The streaming GEMV per format: (rows per program, columns per iteration, num_warps), the configuration with the
# least time summed over a Llama-3.1-8B layer's four projections in `benchmarks/quant_matmul.py`'s sweep on an
# H200 (benchmarks/RESULTS.md; for int4, the best of its three variants together).
STREAM_CONFIGS: dict[int, tuple[int, int, int]] = {fmt: (4, 1024, 4) for fmt in (INT4, *GGUF_FORMATS)}
# Up to this many rows :func:`quant_linear` runs the streaming GEMV once per row (the programs of one row tile
# run together, so the weight comes from memory once and from L2 for the other rows, but each row decodes it
# again: the time grows with the rows); the fused GEMM for fewer than :data:`DEQUANTIZE_MIN_ROWS`; from there the
# weight is dequantized for cuBLAS. Up to 8 rows the GEMV took less time than dequantize + cuBLAS for every
# format but Q8_0 / Q6_K at 8 rows (benchmarks/RESULTS.md).
GEMV_MAX_ROWS = 8
DEQUANTIZE_MIN_ROWS = GEMV_MAX_ROWS + 1


def _output(x: torch.Tensor, w: QuantOperand, caller: str) -> tuple[int, torch.Tensor]:
    """(rows of ``x``, the empty [M, N] output in x's dtype), after checking x is [M, K] with contiguous rows."""
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"{caller} takes x [M, {k}] with contiguous rows, got {tuple(x.shape)}")
    return x.shape[0], torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)


def quant_gemv(x: torch.Tensor, w: QuantOperand, bias: torch.Tensor | None = None,
               config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x`` [M, K] (contiguous rows, M small) times the quantized weight, transposed, plus ``bias`` → [M, N] in
    x's dtype, by the streaming GEMV (one grid row of programs per row of x); ``config`` overrides the format's
    :data:`STREAM_CONFIGS` entry (rows per program, columns per iteration, warps)."""
    n, k = w.shape
    m, y = _output(x, w, "quant_gemv")
    if m == 0:
        return y
    block_n, k_tile, warps = config or STREAM_CONFIGS[w.format]
    grid = (triton.cdiv(n, block_n), m)
    b = bias if bias is not None else x
    if w.format == INT4:
        group = max(w.group_size, 1)
        sub = min(group & -group, k_tile, triton.next_power_of_2(k))  # a power of two inside one group
        if sub < 2:  # an odd group size: no whole bytes per group
            return quant_gemv_tiles(x, w, bias)
        (wp, sp, zp), (sw, ss, sz) = w.args()
        subs = min(max(k_tile // sub, 1), triton.next_power_of_2(triton.cdiv(k, sub)))
        _int4_gemv_kernel[grid](x, wp, sp, zp, b, y, n, x.stride(0), y.stride(0), sw, ss, sz, K=k, GROUP=group,
                                SUB=sub, HAS_ZEROS=w.zeros is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n,
                                SUBS=subs, EVEN=n % block_n == 0 and k % (sub * subs) == 0, num_warps=warps)
        return y
    values, nbytes = gguf_block(w.format)
    blocks = k // values
    _gguf_gemv_kernel[grid](x, w.data, b, y, n, x.stride(0), y.stride(0), w.data.stride(0), BLOCKS=blocks,
                            BLOCK_BYTES=nbytes, FORMAT=w.format, HAS_BIAS=bias is not None, BLOCK_N=block_n,
                            BPI=min(max(k_tile // values, 1), triton.next_power_of_2(blocks)), num_warps=warps)
    return y


def quant_gemv_tiles(x: torch.Tensor, w: QuantOperand, bias: torch.Tensor | None = None,
                     config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x`` [1, K] times the quantized weight through the generic per-element tile (any int4 group size)."""
    n, k = w.shape
    if x.dim() != 2 or x.shape != (1, k) or x.stride(1) != 1:
        raise ValueError(f"quant_gemv_tiles takes x [1, {k}] with contiguous rows, got {tuple(x.shape)}")
    block_n, block_k, warps = config or GEMV_CONFIG
    (wp, sp, zp), (sw, ss, sz) = w.args()
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, wp, sp, zp, bias if bias is not None else x, y, n, sw, ss, sz, K=k, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(k)), num_warps=warps, **w.meta())
    return y


def quant_gemm(x: torch.Tensor, w: QuantOperand, bias: torch.Tensor | None = None,
               config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """``x`` [M, K] (contiguous rows) times the quantized weight, transposed, plus ``bias`` → [M, N] in x's dtype,
    each tile dequantized to x's dtype and multiplied with ``tl.dot`` (float32 accumulation)."""
    n, k = w.shape
    m, y = _output(x, w, "quant_gemm")
    if m == 0:
        return y
    block_m, block_n, block_k, warps, stages = config or GEMM_CONFIG
    (wp, sp, zp), (sw, ss, sz) = w.args()
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _gemm_kernel[grid](
        x, wp, sp, zp, bias if bias is not None else x, y, m, n, x.stride(0), y.stride(0), sw, ss, sz, K=k,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_F32=x.dtype == torch.float32 or x.device.type != "cuda", num_warps=warps, num_stages=stages, **w.meta())
    return y


# (rows, columns) per program of the streaming dequantizers (int4, Q4_0, Q4_K: the formats kept by default).
DEQUANTIZE_TILE = (8, 1024)


def dequantize(w: QuantOperand, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in ``dtype`` (stored column order), computed in float32: int4, Q4_0 and Q4_K by streaming
    dequantizers (runs of packed bytes, contiguous stores), the other formats by the per-element tile."""
    n, k = w.shape
    out = torch.empty(n, k, dtype=dtype, device=w.data.device)
    (wp, sp, zp), (sw, ss, sz) = w.args()
    block_n, k_tile = DEQUANTIZE_TILE
    group = max(w.group_size, 1)
    sub = min(group & -group, k_tile, triton.next_power_of_2(k))
    if w.format == INT4 and sub >= 2:
        subs = min(k_tile // sub, triton.next_power_of_2(triton.cdiv(k, sub)))
        _int4_dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, sub * subs))](
            wp, sp, zp, out, n, sw, ss, sz, K=k, GROUP=group, SUB=sub, HAS_ZEROS=w.zeros is not None,
            BLOCK_N=block_n, SUBS=subs, num_warps=4)
    elif w.format in (Q4_0, Q4_K):
        values, nbytes = gguf_block(w.format)
        bpi = min(max(k_tile // values, 1), triton.next_power_of_2(k // values))
        _gguf_dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k // values, bpi))](
            w.data, out, n, sw, k, BLOCKS=k // values, BLOCK_BYTES=nbytes, FORMAT=w.format, BLOCK_N=block_n, BPI=bpi,
            num_warps=4)
    else:
        _dequantize_kernel[(triton.cdiv(n, 32), triton.cdiv(k, 256))](
            wp, sp, zp, out, n, k, sw, ss, sz, BLOCK_N=32, BLOCK_K=256, num_warps=4, **w.meta())
    return out


def quant_linear(x: torch.Tensor, w: QuantOperand, bias: torch.Tensor | None = None,
                 perm: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] times the quantized weight (stored columns multiply ``x[..., perm]``) plus ``bias``: up to
    :data:`GEMV_MAX_ROWS` rows → :func:`quant_gemv`; fewer than :data:`DEQUANTIZE_MIN_ROWS` → :func:`quant_gemm`;
    from there the weight dequantized (:func:`dequantize`) and ``F.linear``. The output has x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if perm is not None:
        x2 = x2.index_select(1, perm)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] <= GEMV_MAX_ROWS:
        y = quant_gemv(x2, w, bias)
    elif x2.shape[0] < DEQUANTIZE_MIN_ROWS:
        y = quant_gemm(x2, w, bias)
    else:
        y = torch.nn.functional.linear(x2, dequantize(w, x2.dtype), bias)
    return y.reshape(*x.shape[:-1], w.shape[0])


__all__ = ["DEQUANTIZE_MIN_ROWS", "DEQUANTIZE_TILE", "GEMM_CONFIG", "GEMV_CONFIG", "GEMV_MAX_ROWS", "GGUF_FORMATS",
           "INT4", "QuantOperand", "STREAM_CONFIGS", "dequantize", "gguf_block", "quant_gemm", "quant_gemv",
           "quant_gemv_tiles", "quant_linear"]
