"""The batch-1 GEMV kernel against a float64 reference (in Triton's interpreter on a machine
without CUDA), and which calls :class:`DecodeLinear` sends to it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dockyard.ops import linear
from dockyard.ops.dispatch import FUSED_ENV
from tests.helpers import import_kernels

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = DEVICE.type == "cpu"
tg = import_kernels("dockyard.ops.triton_gemv", INTERPRET)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k", "bias"), [(40, 96, False), (33, 200, True), (8, 64, True)])
@pytest.mark.parametrize("config", [(4, 32, 4), (8, 64, 4), (16, 256, 8)])
def test_gemv_equals_float64(dtype, n, k, bias, config):
    """Ragged row blocks and K tails (n, k not multiples of the blocks), with and without bias."""
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=gen).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    got = tg.gemv(x, w, b, config=config)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    assert got.shape == (1, n) and got.dtype == dtype
    # float32 accumulation of exact products: the sum's rounding; bfloat16 adds the output's rounding.
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_gemv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="x \\[1, K\\]"):
        tg.gemv(torch.zeros(2, 8), torch.zeros(4, 8))


def test_decode_linear_sends_single_rows_to_the_kernel(monkeypatch):
    monkeypatch.setenv(FUSED_ENV, "1")
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 40, bias=False)).to(DEVICE)
    assert linear.use_gemv_for_single_rows(model) == 2
    assert all(isinstance(m, linear.DecodeLinear) for m in model)
    calls = []
    kernel = tg.gemv
    monkeypatch.setattr(tg, "gemv", lambda *a, **k: calls.append(a) or kernel(*a, **k))
    one, many = torch.randn(1, 64, device=DEVICE), torch.randn(3, 64, device=DEVICE)
    want_one = nn.functional.linear(nn.functional.linear(one, model[0].weight, model[0].bias), model[1].weight)
    torch.testing.assert_close(model(one), want_one, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
    model(many)
    assert len(calls) == 2  # several rows stay on F.linear
    monkeypatch.setenv(linear.GEMV_ENV, "0")
    model(one)
    assert len(calls) == 2
