"""Matrix-vector product for one-row activations (batch-1 decode): ``y = x @ w.T (+ bias)``.

At one token per step every projection is a GEMV bound by reading the weight once. The kernel
gives each program ``BLOCK_N`` weight rows and streams them along K in ``BLOCK_K`` tiles,
accumulating the elementwise products in float32 registers and reducing once at the end; there
are enough programs (N / BLOCK_N) to keep every multiprocessor's loads in flight. Configurations
per weight shape come from ``benchmarks/gemv.py`` on an H100 (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# tl.sum's combine function is decorated when triton.language is imported, so under an interpreter
# switched on later it would not be interpreted (the tests run this module interpreted): this one is ours.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, N, stride_w,
                 K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
    acc = tl.full([BLOCK_N, BLOCK_K], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + cols) < K
        x = tl.load(x_ptr + k0 + cols, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += w * x[None, :]
    y = tl.reduce(acc, 1, _add)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


# (BLOCK_N, BLOCK_K, num_warps): the fastest of 12 on an H100 at Llama-3.1-8B's q/k/v, o, gate/up and
# lm_head shapes (K 4096; 0.84-1.03 of the copy bandwidth), `benchmarks/gemv.py --sweep`.
DEFAULT_CONFIG = (4, 1024, 8)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x`` [1, K] times ``weight`` [N, K] (contiguous rows) transposed, plus ``bias`` [N] → [1, N] in x's dtype."""
    if x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv takes x [1, K] and weight [N, K]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("gemv needs contiguous rows in x and weight")
    n, k = weight.shape
    block_n, block_k, warps = config or DEFAULT_CONFIG
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y, n, weight.stride(0),
        K=k, BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(k)), HAS_BIAS=bias is not None,
        num_warps=warps,
    )
    return y


__all__ = ["DEFAULT_CONFIG", "gemv"]
