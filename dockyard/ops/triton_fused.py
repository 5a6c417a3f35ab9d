"""Fused small ops as Triton kernels: RMSNorm (with the residual add), rotary embedding in place,
SiLU-and-mul. The GPU path behind :mod:`ops.norm`, :mod:`ops.rotary` and :mod:`ops.activation`.

At decode, a Llama layer's matmuls read megabytes while each of these ops touches a few kilobytes;
written as PyTorch expressions they cost 6-20 kernel launches each (a float copy, a square, a mean,
an rsqrt, products, a concatenation, a cast), so at batch 1 they took more GPU time than the
attention. Each kernel here is one launch with the reference's arithmetic: statistics and rotations
in float32, results rounded to the activation dtype at the points where the reference rounds, so
in float32 they equal it to rounding and in bfloat16 they agree to the last bit but for a few
rounding flips (the tests measure it).

One program handles one token row (RMSNorm, SiLU-and-mul) or one token's heads (rotary). They run on
CUDA (see :func:`dockyard.ops.dispatch.fused_ops_enabled`), and on the CPU under
``TRITON_INTERPRET=1`` (set before this module is imported), which is how the tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dockyard.ops.fp8_format import E4M3_MAX
from dockyard.ops.fp8_kv import is_fp8

_E4M3_MAX = tl.constexpr(E4M3_MAX)


# Triton's own jit helpers (tl.sum, tl.sigmoid) are decorated when triton.language is imported, so
# under an interpreter switched on later they would not be interpreted; these are this module's.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_res, stride_out,
                     stride_res_out, n_cols, eps, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     ONE_PLUS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the activation dtype: it is the residual stream the reference keeps.
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0).to(tl.float32))
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=ok)
    xf = x.to(tl.float32)
    mean_square = tl.reduce(xf * xf, 0, _add) / n_cols
    normed = xf / tl.sqrt(mean_square + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if ONE_PLUS:  # Gemma: x̂ · (1 + w) in float32, rounded once
        y = normed * (1.0 + w)
    else:  # Llama: x̂ rounded to the activation dtype, then times w (a product in that dtype)
        y = normed.to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, one_plus: bool = False,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension of ``x`` [..., H]; with ``residual``, normalize ``x + residual``
    and also return that sum (what :class:`~dockyard.ops.norm.RMSNorm` returns)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, cols = x2.shape
    out = torch.empty(rows, cols, dtype=x.dtype, device=x.device)
    res2 = res_out = x2
    if residual is not None:
        res2 = residual.reshape(-1, cols)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        res_out = torch.empty_like(out)
    if rows:
        _rms_norm_kernel[(rows,)](
            x2, res2, weight, out, res_out, x2.stride(0), res2.stride(0), out.stride(0), res_out.stride(0),
            cols, float(eps), BLOCK=triton.next_power_of_2(cols), HAS_RESIDUAL=residual is not None,
            ONE_PLUS=one_plus, num_warps=4 if cols <= 4096 else 8,
        )
    out = out.reshape(shape)
    return out if residual is None else (out, res_out.reshape(shape))


@triton.jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, stride_gate, stride_up, stride_out, n_cols,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=ok, other=0.0).to(tl.float32)
    # SiLU rounded to the activation dtype (F.silu's output), then the product in that dtype.
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * u).to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for [T, I] tensors whose rows may be strided (halves of a fused projection)."""
    if gate.shape != up.shape or gate.dim() != 2 or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"silu_and_mul takes two [T, I] tensors with contiguous rows, got {tuple(gate.shape)} "
                         f"and {tuple(up.shape)}")
    rows, cols = gate.shape
    out = torch.empty(rows, cols, dtype=gate.dtype, device=gate.device)
    block = min(1024, triton.next_power_of_2(cols))
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(cols, block))](
            gate, up, out, gate.stride(0), up.stride(0), out.stride(0), cols, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, stride_tok, stride_head, stride_table, n_heads,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HALF
    cos = tl.load(cos_ptr + pos * stride_table + dims, mask=d_ok, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_table + dims, mask=d_ok, other=0.0)[None, :]
    ok = (heads < n_heads)[:, None] & d_ok[None, :]
    base = x_ptr + tok * stride_tok + heads[:, None] * stride_head + dims[None, :]
    x1 = tl.load(base, mask=ok, other=0.0)
    x2 = tl.load(base + HALF, mask=ok, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base, (x1f * cos - x2f * sin).to(x1.dtype), mask=ok)
    tl.store(base + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=ok)


def rotary_in_place(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                    rotary_dim: int) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` features of every head of ``x`` [T, heads, head_dim] in place
    (NeoX halves), at ``positions`` [T] of the float32 ``cos_table``/``sin_table`` [P, rotary_dim / 2]."""
    tokens, heads, _ = x.shape
    if x.stride(-1) != 1 or cos_table.stride(-1) != 1 or sin_table.stride(-1) != 1:
        raise ValueError("rotary_in_place needs a contiguous last dimension")
    half = rotary_dim // 2
    if tokens:
        _rotary_kernel[(tokens,)](
            x, positions, cos_table, sin_table, x.stride(0), x.stride(1), cos_table.stride(0), heads,
            HALF=half, BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(half), num_warps=4,
        )
    return x


@triton.jit
def _rotate_heads(x_ptr, stride_tok, stride_head, tok, n_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate the first 2 * HALF features of every head of one token in place; returns the rotated halves."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    ok = (heads < n_heads)[:, None] & (dims < HALF)[None, :]
    base = x_ptr + tok * stride_tok + heads[:, None] * stride_head + dims[None, :]
    x1 = tl.load(base, mask=ok, other=0.0)
    x2 = tl.load(base + HALF, mask=ok, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    r1 = (x1f * cos - x2f * sin).to(x1.dtype)
    r2 = (x2f * cos + x1f * sin).to(x1.dtype)
    tl.store(base, r1, mask=ok)
    tl.store(base + HALF, r2, mask=ok)
    return r1, r2


@triton.jit
def _rotary_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr,
                      k_scale_ptr, v_scale_ptr,
                      stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
                      stride_c_slot, stride_c_head, stride_table, n_q_heads, n_kv_heads,
                      HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                      BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr, KV_SCALED: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    half = tl.arange(0, BLOCK_HALF)
    h_ok = half < HALF
    cos = tl.load(cos_ptr + pos * stride_table + half, mask=h_ok, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_table + half, mask=h_ok, other=0.0)[None, :]
    _rotate_heads(q_ptr, stride_q_tok, stride_q_head, tok, n_q_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    r1, r2 = _rotate_heads(k_ptr, stride_k_tok, stride_k_head, tok, n_kv_heads, cos, sin, HALF, BLOCK_HK,
                           BLOCK_HALF)
    heads = tl.arange(0, BLOCK_HK)
    head_ok = (heads < n_kv_heads)[:, None]
    dst = heads[:, None] * stride_c_head + slot * stride_c_slot
    ok = head_ok & h_ok[None, :]
    k_inv = 1.0
    v_inv = 1.0
    if KV_SCALED:  # FP8 cache: values divided by the layer's scales (ops.fp8_kv.quantize)
        k_inv = 1.0 / tl.load(k_scale_ptr)
        v_inv = 1.0 / tl.load(v_scale_ptr)
    tl.store(kc_ptr + dst + half[None, :], _cache_value(r1, k_inv, kc_ptr, KV_SCALED), mask=ok)
    tl.store(kc_ptr + dst + HALF + half[None, :], _cache_value(r2, k_inv, kc_ptr, KV_SCALED), mask=ok)
    dims = tl.arange(0, BLOCK_D)
    d_ok = head_ok & (dims < HEAD_DIM)[None, :]
    if 2 * HALF < HEAD_DIM:  # partial rotary: the key's unrotated features, as they are
        tail = head_ok & (dims >= 2 * HALF)[None, :] & (dims < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + tok * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :], mask=tail)
        tl.store(kc_ptr + dst + dims[None, :], _cache_value(k, k_inv, kc_ptr, KV_SCALED), mask=tail)
    v = tl.load(v_ptr + tok * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :], mask=d_ok)
    tl.store(vc_ptr + dst + dims[None, :], _cache_value(v, v_inv, vc_ptr, KV_SCALED), mask=d_ok)


@triton.jit
def _cache_value(x, inv_scale, cache_ptr, KV_SCALED: tl.constexpr):
    """``x`` as the cache stores it: cast, or (FP8) rounded from x / scale in float32, saturated at ±448."""
    if KV_SCALED:
        y = x.to(tl.float32) * inv_scale
        return tl.minimum(tl.maximum(y, -_E4M3_MAX), _E4M3_MAX).to(cache_ptr.dtype.element_ty)
    return x.to(cache_ptr.dtype.element_ty)


def rotary_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_table: torch.Tensor, sin_table: torch.Tensor, rotary_dim: int,
                        kv_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> None:
    """One kernel for a layer's new tokens: rotate q [T, Hq, D] and k [T, Hkv, D] in place (NeoX halves,
    first ``rotary_dim`` features) and store the rotated k and v [T, Hkv, D] at their ``slot_mapping``
    slots of ``kv_cache`` [2, blocks, block_size, Hkv, D] (cast to its dtype; an FP8 cache stores them
    divided by ``k_scale`` / ``v_scale``, as :func:`dockyard.ops.fp8_kv.quantize`)."""
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if (q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or cos_table.stride(-1) != 1
            or sin_table.stride(-1) != 1 or not kv_cache.is_contiguous()):
        raise ValueError("rotary_and_write_kv needs contiguous last dimensions and a contiguous KV cache")
    if tuple(kv_cache.shape[-2:]) != (kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} do not fit the KV cache {tuple(kv_cache.shape)}")
    half = rotary_dim // 2
    kv_scaled = is_fp8(kv_cache)
    if kv_scaled and (k_scale is None or v_scale is None):
        raise ValueError("an FP8 kv_cache needs k_scale and v_scale")
    if tokens:
        _rotary_kv_kernel[(tokens,)](
            q, k, v, positions, slot_mapping, cos_table, sin_table, kv_cache[0], kv_cache[1],
            k_scale if kv_scaled else q, v_scale if kv_scaled else q,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            kv_heads * head_dim, head_dim, cos_table.stride(0), q_heads, kv_heads,
            HALF=half, HEAD_DIM=head_dim, BLOCK_HQ=triton.next_power_of_2(q_heads),
            BLOCK_HK=triton.next_power_of_2(kv_heads), BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_D=triton.next_power_of_2(head_dim), KV_SCALED=kv_scaled, num_warps=4,
        )


__all__ = ["rms_norm", "rotary_and_write_kv", "rotary_in_place", "silu_and_mul"]
