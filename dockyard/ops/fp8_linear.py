"""Native FP8 linear layers: block-scaled e4m3 weights times dynamically quantized activations.

An FP8 checkpoint stores each projection weight as ``float8_e4m3fn`` ``w_q`` [N, K] with a float32
scale grid ``w_s`` (one value per ``block`` = (bn, bk) tile; ragged last tiles), so the real weight
is ``w_q * w_s`` expanded over its tiles. :class:`Fp8Linear` keeps those exact bytes and computes

    y = (x_q * x_s) @ (w_q * w_s)^T  (+ bias)

where the activation ``x`` is quantized on the fly, DeepSeek-V3 style: per token and per group of
:data:`GROUP` (128) columns, ``x_s = max(amax, AMAX_FLOOR) / 448`` (float32) and ``x_q = x / x_s``
rounded to the nearest e4m3 value (ties to even). The GEMM (``triton_fp8.fp8_matmul``, a Triton kernel)
walks K in tiles of 128 columns: each tile's FP8 product is computed on the tensor cores into a fresh
float32 accumulator, multiplied by that tile's activation scales (one per row) and weight scales (one
per output column), and added to a float32 running sum; the result is rounded once to the
activation dtype. N and K need not be multiples of the tiles or of the scale blocks.

Scale layouts: with ``weight_block_size`` [bn, bk] the grid is ``(ceil(N/bn), ceil(K/bk))``; a
per-output-row scale is the grid ``(N, 1)`` with block ``(1, K)``, a per-tensor scale is stored the
same way (its one value repeated per row, which keeps fused q/k/v concatenations exact). The kernel
needs each 128-column activation group to lie inside one weight scale block: ``bk`` a multiple of
128, or ``bk >= K`` (:func:`check_block`).

Where it runs: the kernel on CUDA devices with FP8 tensor cores (compute capability >= 8.9, Ada /
Hopper) with Triton installed (:func:`native_fp8_unavailable` says why not); elsewhere the module
computes the same quantized math in float32 with PyTorch (:func:`fp8_linear_reference`), which is
also the tests' oracle. The loader decides which layers become :class:`Fp8Linear`
(:mod:`dockyard.weights.fp8`); everything else keeps dequantize-on-load.

The kernels live in :mod:`dockyard.ops.triton_fp8` (imported only when a CUDA forward needs them);
the format's constants and shape rules, which both sides follow, in :mod:`dockyard.ops.fp8_format`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dockyard.ops.dispatch import triton_installed
from dockyard.ops.fp8_format import AMAX_FLOOR, E4M3_MAX, FP8_DTYPE, GROUP, check_block, scale_grid_shape

MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and later


# ---------------------------------------------------------------------------------------------
# Where the native path can run
# ---------------------------------------------------------------------------------------------
def native_fp8_unavailable(device: torch.device | str) -> str | None:
    """Why the FP8 kernel cannot run on ``device`` (None: it can): not CUDA, compute capability below
    8.9, or no Triton."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; "
                f"FP8 tensor cores need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or later")
    if not triton_installed():
        return "Triton is not installed"
    return None


# ---------------------------------------------------------------------------------------------
# PyTorch reference (the CPU path and the tests' oracle)
# ---------------------------------------------------------------------------------------------
def round_to_e4m3_reference(y: torch.Tensor) -> torch.Tensor:
    """float32 values (already within ±448) → the nearest float8_e4m3fn (ties to even), by torch's cast."""
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def quantize_activation_reference(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, per ``group`` columns: ``scale = max(amax, AMAX_FLOOR) / 448`` (float32) and ``q = x / scale``
    (float32, correctly rounded) rounded to e4m3. ``x`` [..., K] → (q [..., K] e4m3, scale [..., ceil(K/group)])."""
    shape = x.shape
    k = shape[-1]
    groups = math.ceil(k / group)
    xf = F.pad(x.reshape(-1, k).float(), (0, groups * group - k)).view(-1, groups, group)
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR)
    scale = amax / E4M3_MAX
    q = round_to_e4m3_reference(xf / scale).view(-1, groups * group)[:, :k]
    return q.reshape(shape).contiguous(), scale.reshape(*shape[:-1], groups)


def quantize_weight_blocks(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight [N, K] as block-FP8 checkpoints store it, on ``w``'s device: per ``block`` tile
    ``scale = max(amax, 1e-12) / 448`` (float32) and ``q = w / scale`` rounded to e4m3 (ragged edge tiles).
    Returns (q e4m3 [N, K], scale grid float32) — the ``weight`` and ``weight_scale_inv`` of :class:`Fp8Linear`.
    Online FP8 (``weights.fp8_quantize.quantize_linears_fp8``), tests and benchmarks use it."""
    (rows, cols), (bn, bk) = w.shape, block
    gr, gc = math.ceil(rows / bn), math.ceil(cols / bk)
    tiles = F.pad(w.float(), (0, gc * bk - cols, 0, gr * bn - rows)).view(gr, bn, gc, bk)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX
    q = round_to_e4m3_reference(tiles / scale[:, None, :, None]).view(gr * bn, gc * bk)[:rows, :cols]
    return q.contiguous(), scale


def expand_scale(scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """A scale grid repeated over its ``block`` tiles and cropped to ``shape`` (ragged edges)."""
    bn, bk = block
    return scale.repeat_interleave(bn, 0)[:shape[0]].repeat_interleave(bk, 1)[:, :shape[1]]


def fp8_matmul_reference(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                         block: tuple[int, int], bias: torch.Tensor | None = None,
                         out_dtype: torch.dtype = torch.bfloat16,
                         compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(x_q * x_scale) @ (w_q * w_scale)^T + bias`` on dequantized values in ``compute_dtype``, as ``out_dtype``.

    x_q [M, K] e4m3 with x_scale [M, ceil(K/128)]; w_q [N, K] e4m3 with w_scale, its grid over ``block``.
    """
    m, k = x_q.shape
    x = x_q.to(compute_dtype) * expand_scale(x_scale.to(compute_dtype), (1, GROUP), (m, k))
    w = w_q.to(compute_dtype) * expand_scale(w_scale.to(compute_dtype), block, tuple(w_q.shape))
    y = x @ w.T
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(out_dtype)


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         block: tuple[int, int], bias: torch.Tensor | None = None) -> torch.Tensor:
    """What :class:`Fp8Linear` computes, in PyTorch float32: quantize ``x`` [..., K], multiply, round to x's dtype."""
    x_q, x_s = quantize_activation_reference(x.reshape(-1, x.shape[-1]))
    y = fp8_matmul_reference(x_q, x_s, weight, weight_scale, block, bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------
class Fp8Linear(nn.Module):
    """A Linear whose weight stays FP8: ``weight`` float8_e4m3fn [out, in], ``weight_scale_inv`` float32
    grid over ``block`` (the checkpoint's scale: real weight = weight × scale), optional ``bias`` in the
    model dtype. Forward: the Triton kernels on CUDA, :func:`fp8_linear_reference` elsewhere; the
    output has the input's dtype."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int], bias: bool = False,
                 bias_dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        check_block(block, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.block = (int(block[0]), int(block[1]))
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(scale_grid_shape(out_features, in_features, self.block), dtype=torch.float32, device=device),
            requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"bias={self.bias is not None}")

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """weight × scale over its blocks, in float32 then ``dtype``."""
        w = self.weight.float() * expand_scale(self.weight_scale_inv.float(), self.block, tuple(self.weight.shape))
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            return fp8_linear_reference(x, self.weight, self.weight_scale_inv, self.block, self.bias)
        from dockyard.ops.triton_fp8 import fp8_linear  # Triton is an optional dependency

        return fp8_linear(x, self.weight, self.weight_scale_inv, self.block, self.bias)


def concat_fp8_linears(linears: list[Fp8Linear]) -> Fp8Linear | None:
    """One Fp8Linear whose output is the outputs of ``linears`` side by side, holding the same bytes and
    scales; None when that is not exact: different blocks, input sizes or bias presence, or a part
    before the last whose rows end inside a scale block (its last block row would be shared)."""
    first = linears[0]
    bn = first.block[0]
    if any(lin.block != first.block or lin.in_features != first.in_features
           or (lin.bias is None) != (first.bias is None) for lin in linears):
        return None
    if any(lin.out_features % bn for lin in linears[:-1]):
        return None
    fused = Fp8Linear(first.in_features, sum(lin.out_features for lin in linears), first.block,
                      bias=first.bias is not None, device="meta")
    fused.weight = nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]), requires_grad=False)
    fused.weight_scale_inv = nn.Parameter(torch.cat([lin.weight_scale_inv.detach() for lin in linears]),
                                          requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]), requires_grad=False)
    return fused


def uses_native_fp8(model: nn.Module) -> bool:
    """Whether ``model`` runs any layer through the native FP8 path (holds an :class:`Fp8Linear`)."""
    return any(isinstance(m, Fp8Linear) for m in model.modules())
