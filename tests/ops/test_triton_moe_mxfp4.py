"""The fused MoE kernel with gpt-oss's experts kept MXFP4 (dequantized in registers) against the reference loop on
float64 weights decoded by this test's own e2m1/e8m0 decoder; without CUDA in Triton's interpreter at toy sizes,
on the GPU also at gpt-oss-20b's expert shapes."""

from __future__ import annotations

import pytest
import torch

from dockyard.errors import ConfigError
from dockyard.ops import moe
from dockyard.ops.dispatch import FUSED_ENV
from dockyard.ops.moe import GptOssExperts, moe_reference, mxfp4_expert_banks
from dockyard.testing import rel_rmse
from tests.helpers import import_kernels, interpreter_loop_bounds_fix

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = DEVICE.type == "cpu"
tm = import_kernels("dockyard.ops.triton_moe", INTERPRET)

LIMIT = 7.0  # gpt-oss's swiglu_limit


def e2m1(code: int) -> float:
    """An FP4 nibble's value from the OCP spec: sign bit, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0
    is subnormal."""
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    return sign * (mantissa / 2 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1))


E2M1 = torch.tensor([e2m1(c) for c in range(16)], dtype=torch.float64)


def random_mxfp4(experts: int, rows: int, k: int, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(blocks [E, rows, k/32, 16], scales [E, rows, k/32], the float64 weight [E, k, rows] they mean), on the
    generator's device: random nibbles, scales around 1/sqrt(k)'s exponent."""
    device = gen.device
    codes = torch.randint(0, 16, (experts, rows, k), generator=gen, dtype=torch.uint8, device=device)
    centre = 127 - round(torch.log2(torch.tensor(3.0 * k**0.5)).item())
    scales = torch.randint(centre - 2, centre + 3, (experts, rows, k // 32), generator=gen, dtype=torch.uint8,
                           device=device)
    weight = (E2M1.to(device)[codes.long()]
              * torch.pow(2.0, scales.double() - 127).repeat_interleave(32, dim=-1)).transpose(1, 2)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # element 2j in the low nibble of byte j
    return packed.reshape(experts, rows, k // 32, 16).contiguous(), scales, weight


def banks(experts: int, hidden: int, inter: int, seed: int = 0) -> tuple[GptOssExperts, GptOssExperts]:
    """(the MXFP4 bank, a dense float64 bank holding the weights the test decoded itself), both on DEVICE."""
    gen = torch.Generator(DEVICE).manual_seed(seed)
    with torch.device(DEVICE):
        with mxfp4_expert_banks():
            packed = GptOssExperts(experts, hidden, inter, LIMIT)
        dense = GptOssExperts(experts, hidden, inter, LIMIT).double()
    with torch.no_grad():
        for name, rows, k in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
            blocks, scales, weight = random_mxfp4(experts, rows, k, gen)
            getattr(packed, name + "_blocks").copy_(blocks)
            getattr(packed, name + "_scales").copy_(scales)
            getattr(dense, name).copy_(weight)
            del weight
            bias = torch.randn(experts, rows, generator=gen, device=DEVICE).double() * 0.5
            getattr(packed, name + "_bias").copy_(bias)
            getattr(dense, name + "_bias").copy_(bias)
    return packed, dense


def routing(tokens: int, experts: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights and k distinct random ids per token."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    return torch.rand(tokens, k, generator=gen), ids


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """Under the interpreter: its loop-bound fix; the fused ops dispatch on the CPU."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        interpreter_loop_bounds_fix(monkeypatch)
    monkeypatch.setenv(FUSED_ENV, "1")
    yield


@torch.no_grad()
def check(packed: GptOssExperts, dense: GptOssExperts, tokens: int, k: int, dtype: torch.dtype,
          configs: tuple | None, tol: float, seed: int = 1) -> float:
    weights, ids = (t.to(DEVICE) for t in routing(tokens, packed.num_experts, k, seed))
    hidden = packed.down_proj_bias.shape[1]
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(DEVICE) * 2  # some gates clamp
    want = moe_reference(x.double(), dense, weights.double(), ids)
    got = tm.fused_moe(x.to(dtype), packed.stacked, weights, ids, configs)
    assert got.dtype == dtype and got.shape == x.shape
    error = rel_rmse(got.double(), want)
    assert error < tol, error
    return error


# Tiles smaller than the sizes: several N and K tiles, the last K tile half full (96 = 64 + 32), a ragged N tile.
SMALL_TILES = ((16, 64, 64, 4, 1), (16, 64, 64, 4, 1))


@pytest.mark.parametrize(("tokens", "k", "configs"), [(13, 4, SMALL_TILES), (1, 4, None)])
@torch.no_grad()
def test_mxfp4_fused_moe_float32(tokens: int, k: int, configs) -> None:
    packed, dense = banks(experts=8, hidden=96, inter=64)
    check(packed, dense, tokens, k, torch.float32, configs, tol=1e-5)
    # fused_experts takes the kernel for an MXFP4 bank too; the bank's own reference loop (dequantizing one
    # expert per call) agrees.
    weights, ids = (t.to(DEVICE) for t in routing(5, 8, k, seed=3))
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    want = moe_reference(x.double(), dense, weights.double(), ids)
    assert rel_rmse(moe.fused_experts(x, packed, weights, ids).double(), want) < 1e-5
    packed.use_fused = False
    assert rel_rmse(moe.fused_experts(x, packed, weights, ids).double(), want) < 1e-5


def test_mxfp4_nibble_order_matters() -> None:
    """The comparison catches a kernel that swaps the two nibbles of a byte (the check can fail)."""
    packed, dense = banks(experts=4, hidden=64, inter=32, seed=2)
    with torch.no_grad():
        for name in ("gate_up_proj_blocks", "down_proj_blocks"):
            blocks = getattr(packed, name)
            blocks.copy_((blocks >> 4) | (blocks << 4))
    with pytest.raises(AssertionError):
        check(packed, dense, 7, 2, torch.float32, SMALL_TILES, tol=1e-5)


def test_mxfp4_size_not_multiple_of_block_is_refused() -> None:
    with pytest.raises(ConfigError, match="multiple of 32"), mxfp4_expert_banks():
        GptOssExperts(4, 40, 32, LIMIT)


@pytest.fixture(scope="module")
def gpt_oss_20b_banks() -> tuple[GptOssExperts, GptOssExperts]:
    """gpt-oss-20b's expert banks (32 experts, hidden = intermediate = 2880), built once on the GPU."""
    if INTERPRET:
        pytest.skip("gpt-oss-20b's shapes and bfloat16 dots need the GPU")
    return banks(experts=32, hidden=2880, inter=2880, seed=5)


@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_mxfp4_fused_moe_gpt_oss_20b_shapes(gpt_oss_20b_banks, tokens: int) -> None:
    """gpt-oss-20b's banks, top-4, in bfloat16 with the engine's tiles, against the float64 loop: the error of
    bf16 activations and intermediates only (the weights are exact in bf16)."""
    packed, dense = gpt_oss_20b_banks
    check(packed, dense, tokens, 4, torch.bfloat16, None, tol=1e-2, seed=tokens)
