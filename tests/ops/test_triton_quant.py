"""The quantized-weight kernels (GEMV, GEMM, dequantizer) against independent references: GGUF blocks
against ``gguf.quants.dequantize`` and int4 groups against the published formula computed in float64
here, each then multiplied in float64. On a machine without CUDA they run in Triton's interpreter at
small sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from dockyard.ops.quant_format import Int4Weight
from tests.helpers import import_kernels
from tests.ops.quant_helpers import gguf_rows, int4_weight

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = DEVICE.type == "cpu"
tq = import_kernels("dockyard.ops.triton_quant", INTERPRET)

GGUF_TYPES = ["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
def gguf_operand(qtype: str, n: int, k: int, seed: int = 0) -> tuple[object, torch.Tensor]:
    """(the kernels' operand on DEVICE, the float64 reference weight [n, k] from ``gguf``)."""
    rows = gguf_rows(qtype, n, k, seed)
    ref = torch.from_numpy(gguf_dequantize(rows, GGMLQuantizationType[qtype]).astype(np.float64)).reshape(n, k)
    op = tq.QuantOperand(torch.from_numpy(rows).to(DEVICE), int(GGMLQuantizationType[qtype]), (n, k))
    return op, ref


def int4_operand(weight: Int4Weight) -> object:
    return tq.QuantOperand(weight.packed.to(DEVICE), tq.INT4, (weight.out_features, weight.in_features),
                           weight.scales.to(DEVICE), None if weight.zeros is None else weight.zeros.to(DEVICE),
                           weight.group_size)


def check_product(got: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, dtype: torch.dtype) -> None:
    want = x.double().cpu() @ dense.T
    # float32 accumulation of the products; half-precision inputs add their roundings (x, tile, output).
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert got.dtype == dtype
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_kernels_equal_gguf_reference(qtype):
    """Every byte of a row decoded as ``gguf`` decodes it (dequantizer exactly, in float32), and the streaming
    GEMV (one row; three rows with ragged row tiles of 8 and a ragged last run of blocks: three super-blocks of
    K-quants, 24 blocks of Q4_0 / Q8_0 at 16 per iteration) and the GEMM equal the float64 product."""
    k = 768
    op, ref = gguf_operand(qtype, 12, k, seed=GGUF_TYPES.index(qtype))
    torch.testing.assert_close(tq.dequantize(op, torch.float32).double().cpu(), ref, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(1)
    x1, xm = torch.randn(1, k, generator=gen).to(DEVICE), torch.randn(5, k, generator=gen).to(DEVICE)
    check_product(tq.quant_gemv(x1, op, config=(4, 128, 4)), x1, ref, torch.float32)
    check_product(tq.quant_gemv(xm[:3], op, config=(8, 512, 4)), xm[:3], ref, torch.float32)
    check_product(tq.quant_gemm(xm, op, config=(16, 16, 64, 4, 1)), xm, ref, torch.float32)


@pytest.mark.parametrize(("group", "zeros", "act_order"), [(32, False, False), (64, True, False),
                                                           (128, True, True), (128, False, True)])
def test_int4_kernels_equal_float64(group, zeros, act_order):
    """Group sizes 32/64/128, symmetric and with zero points, with an act-order permutation; K not a
    multiple of the tiles (ragged last group) and N ragged; bias added; the dequantizer exact."""
    n, k = 10, 320
    weight, dense = int4_weight(n, k, group, zeros, act_order, seed=group)
    op = int4_operand(weight)
    perm = None if weight.perm is None else weight.perm.to(DEVICE)
    stored = dense if weight.perm is None else dense[:, weight.perm]  # stored column j is feature perm[j]
    torch.testing.assert_close(tq.dequantize(op, torch.float32).double().cpu(), stored, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(2)
    bias = torch.randn(n, generator=gen).to(DEVICE)
    x1, xm = torch.randn(1, k, generator=gen).to(DEVICE), torch.randn(3, k, generator=gen).to(DEVICE)
    for x in (x1, xm):
        y = tq.quant_linear(x, op, bias, perm)
        check_product(y - bias, x, dense, torch.float32)
    xs = xm if perm is None else xm[:, perm]  # the GEMM walks stored columns
    check_product(tq.quant_gemm(xs.contiguous(), op, bias, config=(16, 16, 64, 4, 1)) - bias, xm, dense, torch.float32)


def test_int4_half_precision_and_large_batch_path(monkeypatch):
    """bfloat16 activations through all three paths (GEMV, GEMM, dequantize + F.linear), and the generic tile
    GEMV the streaming one leaves odd group sizes to."""
    weight, dense = int4_weight(16, 256, 64, True, False, seed=5)
    op = int4_operand(weight)
    monkeypatch.setattr(tq, "GEMV_MAX_ROWS", 2)  # 2 rows through the streaming GEMV, 3 through the GEMM
    monkeypatch.setattr(tq, "DEQUANTIZE_MIN_ROWS", 4)  # 6 dequantized
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 256, generator=gen).to(DEVICE, torch.bfloat16)
    check_product(tq.quant_gemv_tiles(x, op), x, dense, torch.bfloat16)
    for m in (1, 2, 3, 6):
        x = torch.randn(m, 256, generator=gen).to(DEVICE, torch.bfloat16)
        check_product(tq.quant_linear(x, op), x, dense, torch.bfloat16)


def test_operand_refuses_what_no_kernel_reads():
    with pytest.raises(ValueError, match="no kernel for weight format"):
        tq.QuantOperand(torch.zeros(2, 20, dtype=torch.uint8), int(GGMLQuantizationType.Q4_1), (2, 32))
    with pytest.raises(ValueError, match="whole number of 256-value blocks"):
        tq.QuantOperand(torch.zeros(2, 144, dtype=torch.uint8), int(GGMLQuantizationType.Q4_K), (2, 128))
    with pytest.raises(ValueError, match="uint8"):
        tq.QuantOperand(torch.zeros(2, 18), int(GGMLQuantizationType.Q4_0), (2, 32))
