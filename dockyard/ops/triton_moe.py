"""Fused mixture-of-experts on the GPU: device-side token→expert alignment and a grouped GEMM over stacked
expert weights, with no host synchronisation (so an MoE decode step can be captured in a CUDA graph).

``fused_moe(x, stacked, topk_weights, topk_ids)`` computes what ``ops.moe.moe_reference`` computes, in
four launches:

1. ``_align_kernel`` (one program) sorts the T·k (token, slot) *pairs* by expert and pads each expert's
   run to a multiple of ``BLOCK_M`` rows: ``sorted_pairs`` (pair index per row, ``T·k`` = padding) and
   ``block_expert`` (the expert of each ``BLOCK_M``-row block, -1 past the last). Every size is a bound
   known from the shapes alone — at most ``cdiv(T·k, BLOCK_M) + min(E, T·k)`` blocks — so the launches
   that follow have fixed grids; blocks past the used ones exit at once. Pairs routed past the bank
   (experts another expert-parallel rank holds, id ≥ E) get no row and contribute zero.
2. ``_grouped_gemm_kernel`` over (block, N tile): each program reads its block's token rows of x, the
   weight tile of that block's expert only (a decode step reads only the selected experts' weights, each
   once per block), and for gate/up accumulates both halves and applies the activation in registers
   (SiLU-and-mul, or gpt-oss's clamped SwiGLU with biases), writing the intermediate [T·k, I] once.
3. The same kernel for down, multiplied by the routing weight, into float32 rows [T·k, H];
4. ``_combine_kernel`` sums the k rows of a token in a fixed order (no atomics: replays and eager runs agree
   bit for bit), skipping slots routed to another rank, into x's dtype.

``topk_softmax`` is the routing that comes before, for plain softmax top-k (one launch: ``select_experts``
takes it where the fused ops serve).

Weights are addressed through strides, so the Mixtral/Qwen/DeepSeek layout (gate rows then up rows,
[E, 2I, H], built after loading by ``ExpertList.stack_``) and gpt-oss's ([E, H, 2I] shapes, gate/up
interleaved; after loading stored with the reduction dimension contiguous by ``GptOssExperts.stack_``) run
the same kernel. gpt-oss's experts kept MXFP4 (``ops.mxfp4_format``: e2m1 nibbles, an e8m0 scale per 32 values
along the reduction) run it too, dequantized in registers per K tile (``MXFP4``: 4.25 bits read per weight
instead of 16). Tile sizes per token count come from ``benchmarks/moe_kernels.py --sweep`` and
``--graph-sweep`` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from dockyard.ops.mxfp4_format import BLOCK as MXFP4_BLOCK

if TYPE_CHECKING:  # an annotation only: ops/moe.py imports this module (when Triton is installed)
    from dockyard.ops.moe import StackedExperts

# Activations the gate/up GEMM fuses (the ``ACTIVATION`` constexpr).
_NO_ACTIVATION, _SILU_AND_MUL, _GPT_OSS_SWIGLU = 0, 1, 2
_ACTIVATION_CODES = {"silu": _SILU_AND_MUL, "gpt_oss": _GPT_OSS_SWIGLU}


# Triton's own jit helpers (tl.sum, tl.cumsum, tl.sigmoid, tl.zeros) are decorated when triton.language is
# imported, so under an interpreter switched on later (as the tests do) they would not be interpreted; the
# kernels use only builtins and this module's functions.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _align_kernel(ids_ptr, sorted_pairs_ptr, block_expert_ptr, stats_ptr, num_pairs, num_rows, num_blocks,
                  E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                  FILL: tl.constexpr, COUNT: tl.constexpr):
    experts = tl.arange(0, E_POW2)
    lanes = tl.arange(0, CHUNK)
    in_bank = experts < E
    # Tokens per expert, CHUNK pairs at a time as a [CHUNK, E] one-hot.
    counts = tl.full([E_POW2], 0, tl.int32)
    for start in range(0, num_pairs, CHUNK):
        pair = start + lanes
        e = tl.load(ids_ptr + pair, mask=pair < num_pairs, other=E).to(tl.int32)
        hit = ((e[:, None] == experts[None, :]) & in_bank[None, :]).to(tl.int32)
        counts += tl.reduce(hit, 0, _add)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.associative_scan(padded, 0, _add)
    starts = ends - padded
    total = tl.reduce(padded, 0, _add)
    if COUNT:  # stats += (distinct experts routed to, 1 call)
        tl.store(stats_ptr, tl.load(stats_ptr) + tl.reduce((counts > 0).to(tl.int64), 0, _add))
        tl.store(stats_ptr + 1, tl.load(stats_ptr + 1) + 1)
    fill_lanes = tl.arange(0, FILL)
    for start in range(0, num_rows, FILL):
        row = start + fill_lanes
        tl.store(sorted_pairs_ptr + row, num_pairs, mask=row < num_rows)
    for start in range(0, num_blocks, CHUNK):
        block = start + lanes
        first_row = block * BLOCK_M
        # ends is non-decreasing (lanes past E add 0): the experts ending at or before a row precede its expert.
        owner = tl.reduce((ends[None, :] <= first_row[:, None]).to(tl.int32), 1, _add)
        tl.store(block_expert_ptr + block, tl.where(first_row < total, owner, -1), mask=block < num_blocks)
    # The padding rows written above must be in place before any thread overwrites them below.
    tl.debug_barrier()
    seen = tl.full([E_POW2], 0, tl.int32)
    for start in range(0, num_pairs, CHUNK):
        pair = start + lanes
        valid = pair < num_pairs
        e = tl.load(ids_ptr + pair, mask=valid, other=E).to(tl.int32)
        hit = ((e[:, None] == experts[None, :]) & in_bank[None, :]).to(tl.int32)
        before = tl.associative_scan(hit, 0, _add) - hit  # earlier pairs of the same expert in this chunk
        row = tl.reduce(hit * (before + starts[None, :] + seen[None, :]), 1, _add)
        tl.store(sorted_pairs_ptr + row, pair, mask=valid & (e < E))
        seen += tl.reduce(hit, 0, _add)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


@triton.jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, stride_t, scale,
                         E: tl.constexpr, E_POW2: tl.constexpr, K: tl.constexpr, K_POW2: tl.constexpr,
                         RENORMALIZE: tl.constexpr):
    # One token per program: the k largest logits (lowest index first among equals), their softmax weights.
    t = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, E_POW2)
    slots = tl.arange(0, K_POW2)
    logits = tl.load(logits_ptr + t * stride_t + experts, mask=experts < E, other=float("-inf")).to(tl.float32)
    row_max = tl.reduce(logits, 0, _max)
    denominator = tl.reduce(tl.exp(logits - row_max), 0, _add)
    top = tl.full([K_POW2], float("-inf"), tl.float32)
    top_ids = tl.full([K_POW2], 0, tl.int64)
    remaining = logits
    for j in tl.static_range(K):
        best = tl.reduce(remaining, 0, _max)
        best_id = tl.reduce(tl.where(remaining == best, experts, E_POW2), 0, _min)
        top = tl.where(slots == j, best, top)
        top_ids = tl.where(slots == j, best_id.to(tl.int64), top_ids)
        remaining = tl.where(experts == best_id, float("-inf"), remaining)
    if RENORMALIZE:  # softmax over all experts, renormalised over the chosen k == softmax over the k logits
        numerators = tl.exp(top - row_max)
        weights = numerators / tl.reduce(numerators, 0, _add)
    else:
        weights = tl.exp(top - row_max) / denominator
    tl.store(weights_ptr + t * K + slots, weights * scale, mask=slots < K)
    tl.store(ids_ptr + t * K + slots, top_ids, mask=slots < K)


@triton.jit
def _combine_kernel(y_ptr, ids_ptr, out_ptr, H, num_experts, K: tl.constexpr, BLOCK_H: tl.constexpr):
    # out[t] = Σ_j y[t·k + j] over the slots routed to this bank, in slot order (no atomics: deterministic).
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.full([BLOCK_H], 0.0, tl.float32)
    for j in tl.static_range(K):
        routed = tl.load(ids_ptr + t * K + j) < num_experts
        acc += tl.load(y_ptr + (t * K + j) * H + offs, mask=ok & routed, other=0.0)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _mxfp4_values(codes, scales, dtype: tl.constexpr):
    # e2m1 nibble codes (int32 0..15) and their blocks' e8m0 scales (uint8) → values in ``dtype``. The nibble's
    # float32 bit pattern is built directly (exponent field e - 1 + 127 and one mantissa bit; exponent code 0
    # is the subnormal 0 or 0.5) and the scale's is 2^(s - 127) as an exponent field: both exact, as is their
    # product (a 2-bit significand).
    exponent = (codes >> 1) & 3
    mantissa = codes & 1
    bits = tl.where(exponent == 0, mantissa * (126 << 23), ((exponent + 126) << 23) | (mantissa << 22))
    bits = bits | ((codes >> 3) << 31)
    scale = (scales.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    return (bits.to(tl.float32, bitcast=True) * scale).to(dtype)


@triton.jit
def _tile_dot(a, a_odd, b_ptrs, s_ptrs, b_mask, acc, MXFP4: tl.constexpr, PRECISION: tl.constexpr):
    # acc + a · b for one K tile: b as stored, or MXFP4 bytes whose low nibbles meet a's even columns (``a``)
    # and high nibbles its odd ones (``a_odd``).
    b = tl.load(b_ptrs, mask=b_mask, other=0)
    if MXFP4:
        packed = b.to(tl.int32)
        scales = tl.load(s_ptrs, mask=b_mask, other=0)
        acc = tl.dot(a, _mxfp4_values(packed & 15, scales, a.dtype), acc, input_precision=PRECISION)
        acc = tl.dot(a_odd, _mxfp4_values(packed >> 4, scales, a.dtype), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr, topk_weights_ptr, sorted_pairs_ptr, block_expert_ptr, scales_ptr,
    num_pairs, N, K,
    stride_am, stride_be, stride_bn, stride_bk, up_offset,
    stride_bias_e, stride_bias_n, bias_up_offset, stride_cm,
    stride_se, stride_sn, scale_up_offset,
    limit, alpha,
    A_ROWS_PER_TOKEN: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr,
    MUL_WEIGHTS: tl.constexpr, MXFP4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    # c[pair, n] = act(Σ_k a[row(pair), k] · b[e, n, k] (+ bias)) (· topk_weight[pair]) for the block's pairs.
    # MXFP4: b holds bytes of two e2m1 values along k (low nibble: the even k) with a scale per 32 values along k;
    # a byte tile [BLOCK_K / 2, BLOCK_N] is expanded in registers into its even-k and odd-k halves, multiplied by
    # the even and odd columns of a (no interleaving of the two halves needed).
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    a_rows = (pairs // A_ROWS_PER_TOKEN).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    K_STEP: tl.constexpr = BLOCK_K // 2 if MXFP4 else BLOCK_K  # b rows (elements or bytes) per tile
    A_STEP: tl.constexpr = 2 if MXFP4 else 1  # a columns per b row
    offs_k = tl.arange(0, K_STEP)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * A_STEP
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    s_ptrs = scales_ptr + expert.to(tl.int64) * stride_se + offs_n[None, :] * stride_sn + (offs_k // 16)[:, None]
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    acc_up = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < (K - k0) // A_STEP
        a_mask = row_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & n_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if MXFP4:  # a's odd columns, for the high nibbles
            a_odd = tl.load(a_ptrs + 1, mask=a_mask, other=0.0)
        else:
            a_odd = a
        acc = _tile_dot(a, a_odd, b_ptrs, s_ptrs, b_mask, acc, MXFP4, PRECISION)
        if ACTIVATION != 0:
            acc_up = _tile_dot(a, a_odd, b_ptrs + up_offset, s_ptrs + scale_up_offset, b_mask, acc_up, MXFP4,
                               PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += K_STEP * stride_bk
        s_ptrs += BLOCK_K // 32
    if HAS_BIAS:
        bias_ptrs = bias_ptr + expert.to(tl.int64) * stride_bias_e + offs_n * stride_bias_n
        acc += tl.load(bias_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION != 0:
            acc_up += tl.load(bias_ptrs + bias_up_offset, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:  # SiLU(gate) · up
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    elif ACTIVATION == 2:  # gpt-oss: (up + 1) · gate · σ(α · gate), gate ≤ limit, |up| ≤ limit
        if CLAMP:
            acc = tl.minimum(acc, limit)
            acc_up = tl.minimum(tl.maximum(acc_up, -limit), limit)
        acc = (acc_up + 1.0) * (acc / (1.0 + tl.exp(-alpha * acc)))
    if MUL_WEIGHTS:
        acc *= tl.load(topk_weights_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + pairs[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per GEMM by token count: the smallest bucket >= T.
# Up to 2 tokens: the fastest of `benchmarks/moe_kernels.py --graph-sweep 1`; up to 64 tokens: of `--sweep`;
# both at Qwen3-30B-A3B's shape on an H200 (benchmarks/RESULTS.md); past that not swept yet.
MoEConfig = tuple[int, int, int, int, int]
DEFAULT_CONFIGS: dict[int, tuple[MoEConfig, MoEConfig]] = {
    # (gate/up, down)
    2: ((16, 64, 128, 4, 4), (16, 64, 128, 4, 3)),
    8: ((16, 128, 128, 4, 3), (16, 128, 128, 4, 3)),
    64: ((16, 64, 128, 4, 3), (16, 64, 128, 4, 3)),
    512: ((32, 64, 64, 4, 3), (32, 64, 64, 4, 3)),
    1 << 62: ((64, 128, 64, 8, 3), (64, 128, 64, 8, 3)),
}


# Shared memory the pipelined operand tiles of one program may take (Hopper has 227 KiB a block; the rest is
# left for the epilogue's layout conversions).
_SHARED_MEMORY_BUDGET = 212 * 1024


def pick_configs(tokens: int, element_size: int = 2) -> tuple[MoEConfig, MoEConfig]:
    """The (gate/up, down) tile configurations for a batch of ``tokens`` tokens of ``element_size``-byte
    operands (the table is for 2-byte ones; wider operands get narrower K tiles, then fewer stages)."""
    up, down = next(cfg for bound, cfg in sorted(DEFAULT_CONFIGS.items()) if tokens <= bound)
    return _fit_shared_memory(up, element_size, 2), _fit_shared_memory(down, element_size, 1)


def _fit_shared_memory(config: MoEConfig, element_size: int, b_tiles: int) -> MoEConfig:
    block_m, block_n, block_k, warps, stages = config
    while stages * (block_m + b_tiles * block_n) * block_k * element_size > _SHARED_MEMORY_BUDGET:
        if block_k > 32:
            block_k //= 2
        elif stages > 2:
            stages -= 1
        else:
            break
    return block_m, block_n, block_k, warps, stages


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs of ``topk_ids`` [T, k] by expert in ``block_m``-row blocks, on the device.

    Returns (sorted_pairs [blocks · block_m] int32: flat pair index t·k + j, ``T·k`` on padding rows;
    block_expert [blocks] int32: each block's expert, -1 for unused blocks), blocks = cdiv(T·k, block_m) +
    min(E, T·k). Ids ≥ ``num_experts`` (held by another rank) are left out. ``stats`` (int64 [2], optional)
    gets the number of distinct experts routed to and 1 call added (``ops.moe.RoutedExpertCounter``)."""
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    pairs = ids.numel()
    blocks = triton.cdiv(pairs, block_m) + min(num_experts, pairs)
    sorted_pairs = torch.empty(blocks * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=ids.device)
    e_pow2 = triton.next_power_of_2(num_experts)
    # Pairs per step of the [CHUNK, E] one-hot work: bounded for registers, no wider than the pairs there are.
    chunk = max(16, min(256, 8192 // e_pow2, triton.next_power_of_2(pairs)))
    # Padding rows written per step: a decode step's rows in one.
    fill = min(1024, triton.next_power_of_2(blocks * block_m))
    _align_kernel[(1,)](ids, sorted_pairs, block_expert, stats if stats is not None else block_expert,
                        pairs, blocks * block_m, blocks, E=num_experts, E_POW2=e_pow2, BLOCK_M=block_m,
                        CHUNK=chunk, FILL=fill, COUNT=stats is not None, num_warps=4)
    return sorted_pairs, block_expert


def _gemm(a: torch.Tensor, weight: torch.Tensor, strides: tuple[int, int, int], up_offset: int,
          bias: torch.Tensor | None, bias_strides: tuple[int, int, int], out: torch.Tensor,
          topk_weights: torch.Tensor | None, sorted_pairs: torch.Tensor, block_expert: torch.Tensor,
          n: int, k: int, rows_per_token: int, activation: int, limit: float | None, alpha: float,
          config: MoEConfig, scales: torch.Tensor | None = None,
          scale_strides: tuple[int, int, int] = (0, 0, 0)) -> None:
    block_m, block_n, block_k, warps, stages = config
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, weight, bias if bias is not None else weight, out,
        topk_weights if topk_weights is not None else out, sorted_pairs, block_expert,
        scales if scales is not None else weight,
        out.shape[0], n, k,
        a.stride(0), strides[0], strides[1], strides[2], up_offset,
        bias_strides[0], bias_strides[1], bias_strides[2], out.stride(0),
        scale_strides[0], scale_strides[1], scale_strides[2],
        0.0 if limit is None else float(limit), float(alpha),
        A_ROWS_PER_TOKEN=rows_per_token, ACTIVATION=activation, HAS_BIAS=bias is not None,
        CLAMP=limit is not None, MUL_WEIGHTS=topk_weights is not None, MXFP4=scales is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        # float32 models get float32 products (as the reference's matmuls), not TF32.
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
    )


def fused_moe(x: torch.Tensor, stacked: StackedExperts, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              configs: tuple[MoEConfig, MoEConfig] | None = None, stats: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j topk_weights[t, j] · expert_{topk_ids[t, j]}(x[t]) for x [T, H] → [T, H] in x's dtype.

    ``stacked`` describes the expert weights (``ops.moe.StackedExperts``); ids ≥ its expert count contribute
    zero (expert parallelism). ``configs`` overrides the tiles (the sweep uses it); ``stats``: see
    :func:`align_pairs`."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"fused_moe takes x [tokens, hidden] with contiguous rows, got {tuple(x.shape)}")
    tokens, hidden = x.shape
    top_k = topk_ids.shape[-1]
    up_cfg, down_cfg = configs or pick_configs(tokens, x.element_size())
    if up_cfg[0] != down_cfg[0]:
        raise ValueError(f"both GEMMs run on the same aligned blocks: BLOCK_M {up_cfg[0]} != {down_cfg[0]}")
    if stacked.is_mxfp4:
        _check_mxfp4(stacked, hidden, up_cfg, down_cfg)
    if tokens == 0:
        return torch.zeros_like(x)
    sorted_pairs, block_expert = align_pairs(topk_ids, stacked.num_experts, up_cfg[0], stats)
    weights = topk_weights.reshape(-1)
    if weights.dtype != torch.float32 or not weights.is_contiguous():
        weights = weights.float().contiguous()
    inter_size = stacked.intermediate_size
    intermediate = torch.empty(tokens * top_k, inter_size, dtype=x.dtype, device=x.device)
    _gemm(x, stacked.gate_up, stacked.gate_up_strides, stacked.up_offset, stacked.gate_up_bias,
          stacked.gate_up_bias_strides, intermediate, None, sorted_pairs, block_expert,
          inter_size, hidden, top_k, _ACTIVATION_CODES[stacked.activation], stacked.limit, stacked.alpha, up_cfg,
          stacked.gate_up_scales, stacked.gate_up_scale_strides)
    # Rows of pairs routed to another rank's experts are never written; the combine skips them.
    rows = torch.empty(tokens * top_k, hidden, dtype=torch.float32, device=x.device)
    _gemm(intermediate, stacked.down, stacked.down_strides, 0, stacked.down_bias, stacked.down_bias_strides,
          rows, weights, sorted_pairs, block_expert, hidden, inter_size, 1, _NO_ACTIVATION, None, 1.0, down_cfg,
          stacked.down_scales, stacked.down_scale_strides)
    out = torch.empty_like(x)
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    _combine_kernel[(tokens, triton.cdiv(hidden, _COMBINE_BLOCK))](rows, ids, out, hidden, stacked.num_experts,
                                                                   K=top_k, BLOCK_H=_COMBINE_BLOCK)
    return out


def _check_mxfp4(stacked: StackedExperts, hidden: int, up_cfg: MoEConfig, down_cfg: MoEConfig) -> None:
    """The MXFP4 GEMMs read whole 32-value blocks per K tile: K tiles and both reduction sizes multiples of 32."""
    for what, size in (("hidden size", hidden), ("intermediate size", stacked.intermediate_size),
                       ("gate/up BLOCK_K", up_cfg[2]), ("down BLOCK_K", down_cfg[2])):
        if size % MXFP4_BLOCK:
            raise ValueError(f"MXFP4 experts: the {what} {size} is not a multiple of {MXFP4_BLOCK} (one e8m0 scale "
                             f"per {MXFP4_BLOCK} values along the reduction); dequantize the experts instead "
                             "(DOCKYARD_QUANT_NATIVE=0)")


# Hidden elements per program of the combine (a decode step's few tokens still spread over several SMs).
_COMBINE_BLOCK = 512


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing in one launch: the ``top_k`` largest of router_logits [T, E] (any float dtype, computed in
    float32) → (weights [T, k] float32, ids [T, k] int64), best first. Weights: the softmax over all experts of
    the chosen ones, renormalised over them when ``renormalize`` (= the softmax over the k logits), times
    ``scale``. What ``ops.moe.select_experts`` computes for plain greedy softmax routing."""
    if router_logits.dim() != 2 or router_logits.stride(1) != 1:
        raise ValueError(f"topk_softmax takes router logits [tokens, experts] with contiguous rows, "
                         f"got {tuple(router_logits.shape)}")
    tokens, experts = router_logits.shape
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if tokens:
        _topk_softmax_kernel[(tokens,)](router_logits, weights, ids, router_logits.stride(0), float(scale),
                                        E=experts, E_POW2=triton.next_power_of_2(experts), K=top_k,
                                        K_POW2=triton.next_power_of_2(top_k), RENORMALIZE=renormalize,
                                        num_warps=1 if experts <= 256 else 4)
    return weights, ids


__all__ = ["DEFAULT_CONFIGS", "MoEConfig", "align_pairs", "fused_moe", "pick_configs", "topk_softmax"]
