"""Triton kernels of the native FP8 linear (:mod:`dockyard.ops.fp8_linear` holds the module, the PyTorch
reference and what they compute): the per-token, per-128-column activation quantizer and the
block-scaled FP8 GEMM.

They run on CUDA devices with FP8 tensor cores (compute capability >= 8.9), and on the CPU under
``TRITON_INTERPRET=1`` (set before this module is imported: Triton fixes the mode when a kernel is
decorated), which is how the tests check them. The interpreter handles float8 loads, stores of
representable values and ``tl.dot`` on float8 exactly (it widens e4m3 to float16, which holds every
e4m3 value, and multiplies in float32); its float32 → float8 conversion of other values is wrong (ties
round away from even, and a mantissa that rounds up does not carry into the exponent: 127.99 becomes
64), which is why the quantizer rounds to the e4m3 grid itself before the cast.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dockyard.ops.fp8_format import AMAX_FLOOR, E4M3_MAX, FP8_DTYPE, GROUP, check_block, scale_grid_shape

# Groups of 128 columns one quantizer program handles (one per program ran at a fifth of the copy
# bandwidth on an H100: 173 us for an 8192 x 4096 activation, benchmarks/RESULTS.md).
QUANTIZE_GROUPS_PER_PROGRAM = 8


# Triton's own jit helpers (tl.max, tl.cdiv, tl.zeros) are decorated when triton.language is imported, so under
# an interpreter switched on later they would not be interpreted; the kernels use none of them.
@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, n_cols, n_groups, stride_x, stride_q, stride_s,
                     GROUP_SIZE: tl.constexpr, GROUPS: tl.constexpr, FP8_MAX: tl.constexpr, FLOOR: tl.constexpr):
    # One program quantizes GROUPS consecutive groups of one row (a [GROUPS, GROUP_SIZE] tile).
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    g_ok = groups < n_groups
    cols = groups[:, None] * GROUP_SIZE + tl.arange(0, GROUP_SIZE)[None, :]
    ok = (cols < n_cols) & g_ok[:, None]
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.reduce(tl.abs(x), 1, _max), FLOOR)
    scale = tl.math.div_rn(amax, FP8_MAX)  # IEEE division (Triton's `/` on float32 is approximate)
    y = tl.math.div_rn(x, scale[:, None])
    a = tl.minimum(tl.abs(y), FP8_MAX)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    magic = ((e + 147) << 23).to(tl.float32, bitcast=True)  # 2^(e+20): biased exponent e + 20 + 127
    r = (a + magic) - magic
    r = tl.where(y < 0, -r, r)
    tl.store(q_ptr + row * stride_q + cols, r.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + row * stride_s + groups, scale, mask=g_ok)


@triton.jit
def _gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K: tl.constexpr,
                 stride_am, stride_asm, stride_bn, stride_bsn, stride_bsk, stride_cm,
                 scale_bn, scale_bk, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # K is a compile-time constant (one compilation per layer width; it also lets the loop bound be a
    # Python int, which Triton's interpreter needs: it cannot loop to a runtime argument under NumPy 2).
    # Grouped ordering: GROUP_M row tiles run one after another on each column tile (L2 reuse at large M).
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M  # (not tl.cdiv: a Triton jit helper, see _max)
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows_m = offs_m.to(tl.int64)
    rows_n = offs_n.to(tl.int64)
    a_ptrs = a_ptr + rows_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + rows_n[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] of the [N, K] weight
    as_ptrs = as_ptr + rows_m * stride_asm
    bs_ptrs = bs_ptr + (offs_n // scale_bn) * stride_bsn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)  # (tl.zeros is a jit helper)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a_s = tl.load(as_ptrs + k0 // BLOCK_K, mask=m_ok, other=0.0)
        b_s = tl.load(bs_ptrs + (k0 // scale_bk) * stride_bsk, mask=n_ok, other=0.0)
        # Each 128-column tile's product starts from zero, so the tensor cores' own accumulation never
        # spans more than one tile; the tile, times its scales, is added to the float32 sum.
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rows_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] → (x_q [M, K] e4m3, x_scale [M, ceil(K/128)] float32): the values of
    :func:`~dockyard.ops.fp8_linear.quantize_activation_reference`, one program per (row, group)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"quantize_activation: x must be 2-D with contiguous rows, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}; reshape it to [tokens, features] and make it contiguous")
    m, k = x.shape
    groups = math.ceil(k / GROUP)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m:
        per_program = min(QUANTIZE_GROUPS_PER_PROGRAM, triton.next_power_of_2(groups))
        _quantize_kernel[(m, triton.cdiv(groups, per_program))](
            x, q, s, k, groups, x.stride(0), q.stride(0), s.stride(0),
            GROUP_SIZE=GROUP, GROUPS=per_program, FP8_MAX=E4M3_MAX, FLOOR=AMAX_FLOOR)
    return q, s


def default_config(m: int, n: int, k: int) -> dict[str, int]:
    """Tiles, warps and pipeline stages for an [m, k] × [k, n] product: a starting point, not tuned on
    hardware yet (``benchmarks/fp8_matmul.py`` sweeps alternatives). Small m (decode): thin tiles, so
    more programs share the weight read; large m (prefill): 128 × 128 tiles."""
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}


def fp8_matmul(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               block: tuple[int, int], bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
               config: dict[str, int] | None = None) -> torch.Tensor:
    """``(x_q * x_scale) @ (w_q * w_scale)^T + bias`` in ``out_dtype``, accumulated in float32.

    x_q [M, K] e4m3 and x_scale [M, ceil(K/128)] float32 (from :func:`quantize_activation`); w_q [N, K]
    e4m3 and w_scale its float32 grid over ``block`` (:func:`~dockyard.ops.fp8_format.check_block`);
    bias [N] or None. ``config`` overrides :func:`default_config` (keys BLOCK_M, BLOCK_N, num_warps,
    num_stages, GROUP_M).
    """
    if x_q.dim() != 2 or w_q.dim() != 2 or w_q.shape[1] != x_q.shape[1]:
        raise ValueError(f"fp8_matmul: weight shape {tuple(w_q.shape)} does not match activation shape "
                         f"{tuple(x_q.shape)}: they must be [out_features, K] and [tokens, K]")
    m, k = x_q.shape
    n = w_q.shape[0]
    if x_q.dtype != FP8_DTYPE or w_q.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_matmul: x_q and w_q must be {FP8_DTYPE}, got {x_q.dtype} and {w_q.dtype}")
    if x_q.stride(-1) != 1 or w_q.stride(-1) != 1 or x_scale.stride(-1) != 1:
        raise ValueError("fp8_matmul: x_q, x_scale and w_q need contiguous rows; call .contiguous() first")
    check_block(block, k, "fp8_matmul")
    want_w, want_x = scale_grid_shape(n, k, block), (m, math.ceil(k / GROUP))
    if tuple(w_scale.shape) != want_w or tuple(x_scale.shape) != want_x:
        raise ValueError(f"fp8_matmul: scale shapes {tuple(x_scale.shape)} (activation) and {tuple(w_scale.shape)} "
                         f"(weight, block {list(block)}) must be {want_x} and {want_w}")
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    cfg = {**default_config(m, n, k), **(config or {})}
    block_m, block_n, group_m = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("GROUP_M", 8)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _gemm_kernel[grid](
        x_q, x_scale, w_q, w_scale, bias if bias is not None else w_scale, out, m, n, k,
        x_q.stride(0), x_scale.stride(0), w_q.stride(0), w_scale.stride(0), w_scale.stride(1), out.stride(0),
        block[0], block[1], HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=GROUP,
        GROUP_M=group_m, **cfg,
    )
    return out


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, block: tuple[int, int],
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """What :class:`~dockyard.ops.fp8_linear.Fp8Linear` computes on CUDA: quantize ``x`` [..., K], then the GEMM;
    the output [..., N] has x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    x_q, x_s = quantize_activation(x2)
    y = fp8_matmul(x_q, x_s, weight, weight_scale, block, bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])
