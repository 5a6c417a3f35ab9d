"""The native FP8 linear: activation quantizer and block-scaled GEMM (Triton kernels and the PyTorch
reference) against float64 math, the Fp8Linear module, which path an FP8 checkpoint takes, fused
projections, and loading an FP8 checkpoint natively against dequantize-on-load.

Without CUDA the kernels run in Triton's interpreter (small shapes); the whole-model comparison on
the kernels needs a GPU with FP8 tensor cores (compute capability >= 8.9) and is skipped elsewhere.
The float64 oracle rounds to e4m3 from the format's definition (its list of values), not with torch's cast.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dockyard.engine.llm import LLM
from dockyard.errors import WeightsError
from dockyard.ops.fp8_linear import (
    AMAX_FLOOR,
    E4M3_MAX,
    GROUP,
    Fp8Linear,
    check_block,
    concat_fp8_linears,
    fp8_matmul_reference,
    native_fp8_unavailable,
    quantize_activation_reference,
    quantize_weight_blocks,
    uses_native_fp8,
)
from dockyard.weights.fp8 import FP8_NATIVE_ENV, choose_fp8_path
from dockyard.weights.quant_config import FP8Config
from tests.helpers import import_kernels, rel_rmse
from tests.weights.test_fp8 import LOGITS_BOUND, PROMPTS, checkpoints  # noqa: F401  (checkpoints: a fixture)

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = DEVICE.type == "cpu"
NATIVE_GPU = native_fp8_unavailable(DEVICE) is None
tk = import_kernels("dockyard.ops.triton_fp8", INTERPRET)
needs_fp8_gpu = pytest.mark.skipif(
    not NATIVE_GPU, reason=f"the FP8 kernels need a CUDA GPU with FP8 tensor cores: {native_fp8_unavailable(DEVICE)}")
kernel_device = pytest.mark.skipif(
    not (INTERPRET or NATIVE_GPU),
    reason=f"a CUDA GPU without FP8 tensor cores cannot run the kernel: {native_fp8_unavailable(DEVICE)}")


# ---- the float64 oracle ----
def _e4m3_values() -> torch.Tensor:
    """The finite non-negative float8_e4m3fn values from the format's definition, ascending; position = code.
    Subnormals m/8 · 2^-6; normals (1 + m/8) · 2^e for e in [-6, 8]; 2^8 · 15/8 (code 0x7F) is NaN."""
    values = [m / 8 * 2.0 ** -6 for m in range(8)]
    values += [(1 + m / 8) * 2.0 ** e for e in range(-6, 9) for m in range(8)]
    return torch.tensor(values[:127], dtype=torch.float64)


E4M3_VALUES = _e4m3_values()


def round_e4m3_64(y: torch.Tensor) -> torch.Tensor:
    """float64 → the nearest e4m3 value (ties to the even code), as float64; |y| must be <= 448."""
    a = y.abs().clamp(max=E4M3_MAX)
    hi = torch.searchsorted(E4M3_VALUES, a).clamp(max=126)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - E4M3_VALUES[lo], E4M3_VALUES[hi] - a
    pick = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    return torch.where(y < 0, -E4M3_VALUES[pick], E4M3_VALUES[pick])


def quantize64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantizer in float64: the documented float32 roundings (the scale and the quotient),
    the rest exact. Returns (q as float64, scale as float32)."""
    m, k = x.shape
    groups = math.ceil(k / GROUP)
    x64 = torch.nn.functional.pad(x.double(), (0, groups * GROUP - k)).view(m, groups, GROUP)
    scale = (x64.abs().amax(-1).clamp(min=AMAX_FLOOR) / E4M3_MAX).float()
    y = (x64 / scale.double()[..., None]).float().double()
    return round_e4m3_64(y).view(m, groups * GROUP)[:, :k], scale


def matmul64(x_q, x_s, w_q, w_s, block, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q · x_s) @ (w_q · w_s)^T + bias in float64, and the same over absolute values (the error scale)."""
    def expand(s, b, shape):
        return s.double().repeat_interleave(b[0], 0)[:shape[0]].repeat_interleave(b[1], 1)[:, :shape[1]]
    x = x_q.double() * expand(x_s, (1, GROUP), x_q.shape)
    w = w_q.double() * expand(w_s, block, w_q.shape)
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return x @ w.T + b, x.abs() @ w.abs().T + b.abs()


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    """Random rows, plus (when there are enough rows) a zero row and a row spanning 10 orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 3
    if m >= 3:
        x[1] = 0
        x[2] *= torch.logspace(-10, 0, k)[torch.randperm(k, generator=gen)]
    return x


# ---- the oracle itself ----
def test_e4m3_oracle_is_the_format():
    codes = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert torch.equal(codes.double(), E4M3_VALUES)  # torch decodes every code to the oracle's value
    y = torch.tensor([1.0625, 1.1875, 127.99, 0.0029, 448.0, -300.5, 2.0 ** -10, 3 * 2.0 ** -11], dtype=torch.float64)
    # ties to even (1.0625 between 1 and 1.125 → 1; 1.1875 → 1.25), carry (127.99 → 128), spacing 32 in
    # [256, 448], subnormals every 2^-9 (0.0029 = 1.48 · 2^-9; 2^-10 a tie between 0 and 2^-9 → 0)
    want = torch.tensor([1.0, 1.25, 128.0, 2.0 ** -9, 448.0, -288.0, 0.0, 2.0 ** -9], dtype=torch.float64)
    assert torch.equal(round_e4m3_64(y), want)


def test_weight_block_quantizer_matches_float64():
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(9)) * torch.logspace(-6, 1, 300)
    w[:, 256:] = 0  # an all-zero (ragged) block
    q, s = quantize_weight_blocks(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3) and s.dtype == torch.float32
    for i in range(2):
        for j in range(3):
            tile = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double()
            scale = (tile.abs().max().clamp(min=1e-12) / E4M3_MAX).float()
            assert s[i, j] == scale
            want = round_e4m3_64((tile / scale.double()).float().double())
            assert torch.equal(q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double(), want)


# ---- activation quantizer ----
EDGE_ROW = [448.0, 1.0625, 1.1875, 127.99, 0.0029, -300.5, -1.0625, 2.0 ** -10]  # amax 448 → scale exactly 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_quantizer_matches_float64(dtype):
    x = activations(6, 300, seed=0)
    x[3, :len(EDGE_ROW)] = torch.tensor(EDGE_ROW)
    x[3, len(EDGE_ROW):GROUP] = 0
    x = x.to(dtype)
    q, s = quantize_activation_reference(x)
    q64, s64 = quantize64(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (6, 3) and s.dtype == torch.float32
    assert torch.equal(s, s64)
    assert torch.equal(q.double(), q64)
    assert torch.equal(q64[3, :len(EDGE_ROW)], round_e4m3_64(torch.tensor(EDGE_ROW, dtype=torch.float64)))
    assert (q.double()[1] == 0).all() and (s[1] == AMAX_FLOOR / E4M3_MAX).all()  # zero row: no NaN, tiny scale


@kernel_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 300), (1, 128), (3, 17), (2, 1300)])  # 1300: 11 groups, 2 programs a row
def test_quantize_kernel_matches_float64(dtype, shape):
    x = activations(*shape, seed=1)
    if shape[0] >= 4:
        x[3, :len(EDGE_ROW)] = torch.tensor(EDGE_ROW)
        x[3, len(EDGE_ROW):GROUP] = 0
    x = x.to(DEVICE, dtype)
    q, s = tk.quantize_activation(x)
    q64, s64 = quantize64(x.cpu())
    assert torch.equal(s.cpu(), s64)
    assert torch.equal(q.cpu().double(), q64)


# ---- GEMM ----
GEMM_CASES = [  # (M, N, K, weight scale block): ragged N and K, one-row decode, per-channel, wide K blocks
    (5, 200, 300, (128, 128)),
    (1, 130, 128, (128, 128)),
    (17, 64, 257, (128, 128)),
    (3, 96, 300, (1, 300)),  # per output row (a per-tensor scale is loaded as this grid too)
    (20, 70, 384, (128, 256)),
]


def gemm_bound(abs_ref: torch.Tensor, k: int, out_dtype: torch.dtype, ref: torch.Tensor) -> torch.Tensor:
    """How far the float32-accumulated result may be from the float64 one, elementwise. Each product of two
    e4m3 values is exact in float32; a 128-column tile sums up to 128 of them, is scaled twice and added to
    the running sum: at most (128 + 3 + K/128) roundings of 2^-24 relative to the sum of |terms|. On a GPU
    FP8 tensor cores may accumulate a tile with fewer bits (Hopper keeps about 14, per DeepSeek-V3's
    report): 128 · 2^-14 there. Then the output rounding: half a unit in the last place of bfloat16 on
    a GPU, a whole one in the interpreter (it truncates)."""
    tile = 128 * 2.0 ** -24 if INTERPRET else 128 * 2.0 ** -14
    bound = (tile + (3 + math.ceil(k / GROUP)) * 2.0 ** -24) * abs_ref
    if out_dtype == torch.bfloat16:
        bound = bound + ref.abs() * (2.0 ** -7 if INTERPRET else 2.0 ** -8)
    return bound + 1e-30


@kernel_device
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m, n, k, block", GEMM_CASES)
def test_gemm_kernel_matches_float64(m, n, k, block, with_bias, out_dtype):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x_q, x_s = quantize_activation_reference(activations(m, k, seed=m + k))
    w_q, w_s = quantize_weight_blocks(torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen), block)
    bias = torch.randn(n, generator=gen) if with_bias else None
    assert x_q.is_contiguous() and w_q.is_contiguous()  # reading past K would read the next row: caught below
    ref, abs_ref = matmul64(x_q, x_s, w_q, w_s, block, bias)
    dev = [t.to(DEVICE) if t is not None else None for t in (x_q, x_s, w_q, w_s, bias)]
    out = tk.fp8_matmul(*dev[:4], block, dev[4], out_dtype=out_dtype).cpu()
    assert out.shape == (m, n) and out.dtype == out_dtype
    err = (out.double() - ref).abs()
    assert (err <= gemm_bound(abs_ref, k, out_dtype, ref)).all(), f"max error {err.max():.3g}"
    assert rel_rmse(out.double(), ref) < (1e-6 if out_dtype == torch.float32 and INTERPRET else 5e-3)
    # Other tile shapes cover the masks at tile edges differently; the result must not depend on them.
    other = tk.fp8_matmul(*dev[:4], block, dev[4], out_dtype=out_dtype,
                          config={"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 2}).cpu()
    assert (((other.double() - ref).abs()) <= gemm_bound(abs_ref, k, out_dtype, ref)).all()


@pytest.mark.parametrize("m, n, k, block", GEMM_CASES)
def test_reference_matmul_matches_float64(m, n, k, block):
    x_q, x_s = quantize_activation_reference(activations(m, k, seed=7))
    w_q, w_s = quantize_weight_blocks(torch.randn(n, k, generator=torch.Generator().manual_seed(8)), block)
    ref, abs_ref = matmul64(x_q, x_s, w_q, w_s, block)
    out = fp8_matmul_reference(x_q, x_s, w_q, w_s, block, out_dtype=torch.float32)
    # float32 dequantized operands (each exact: e4m3 × a float32 scale rounds once) and a float32 matmul
    assert ((out.double() - ref).abs() <= (k + 4) * 2.0 ** -24 * abs_ref * 2 + 1e-30).all()


def test_kernel_refuses_what_it_cannot_compute():
    x_q, x_s = quantize_activation_reference(torch.randn(2, 256))
    w_q, w_s = quantize_weight_blocks(torch.randn(64, 256), (64, 64))
    with pytest.raises(ValueError, match=r"scale block \[64, 64\] has 64 columns.*groups of 128 columns"):
        tk.fp8_matmul(x_q, x_s, w_q, w_s, (64, 64))
    w_q, w_s = quantize_weight_blocks(torch.randn(64, 256), (128, 128))
    with pytest.raises(ValueError, match=r"weight shape \(64, 256\) does not match activation shape \(2, 128\)"):
        tk.fp8_matmul(x_q[:, :128], x_s[:, :1], w_q, w_s, (128, 128))
    with pytest.raises(ValueError, match=r"must be \(2, 2\) and \(1, 2\)"):
        tk.fp8_matmul(x_q, x_s, w_q, w_s[:, :1], (128, 128))
    check_block((1, 300), 300)  # per-channel: one block spans every column
    with pytest.raises(ValueError, match="DOCKYARD_FP8_NATIVE=0"):
        Fp8Linear(256, 64, (128, 64))


# ---- the module ----
def _fp8_linear(n: int, k: int, block: tuple[int, int], seed: int, bias: bool = False) -> Fp8Linear:
    gen = torch.Generator().manual_seed(seed)
    layer = Fp8Linear(k, n, block, bias=bias, bias_dtype=torch.float32)
    q, s = quantize_weight_blocks(torch.randn(n, k, generator=gen) / math.sqrt(k), block)
    with torch.no_grad():
        layer.weight.copy_(q)
        layer.weight_scale_inv.copy_(s)
        if bias:
            layer.bias.copy_(torch.randn(n, generator=gen))
    return layer


def test_fp8_linear_on_cpu_is_the_quantized_math():
    layer = _fp8_linear(200, 300, (128, 128), seed=3, bias=True)
    x = activations(6, 300, seed=4).view(2, 3, 300)
    y = layer(x)
    assert y.shape == (2, 3, 200) and y.dtype == torch.float32
    x_q, x_s = quantize64(x.reshape(6, 300))
    ref, abs_ref = matmul64(x_q, x_s, layer.weight, layer.weight_scale_inv, layer.block, layer.bias)
    assert ((y.reshape(6, 200).double() - ref).abs() <= 2 * (300 + 4) * 2.0 ** -24 * abs_ref + 1e-30).all()
    # Against the dequantized weight applied to the unquantized activation: only the activation's e4m3
    # rounding differs, at most 2^-4 of each value (normal range) or 2^-10 of its group's scale.
    plain = nn.functional.linear(x.double(), layer.dequantized_weight(torch.float64), layer.bias.double())
    x64 = x.reshape(6, 300).double()
    err_x = x64.abs() * 2.0 ** -4 + (x64.abs().max() / E4M3_MAX) * 2.0 ** -10
    bound = err_x @ layer.dequantized_weight(torch.float64).abs().T
    assert ((y.double() - plain).abs().reshape(6, 200) <= bound * 1.001 + 1e-6).all()
    assert 0 < rel_rmse(y.double(), plain) < 0.05


def test_concatenated_fp8_projections_hold_the_same_bytes_and_scales():
    q, k, v = (_fp8_linear(n, 256, (128, 128), seed=n) for n in (256, 128, 128))
    fused = concat_fp8_linears([q, k, v])
    assert fused is not None and fused.out_features == 512 and fused.block == (128, 128)
    assert torch.equal(fused.weight.view(torch.uint8), torch.cat([p.weight for p in (q, k, v)]).view(torch.uint8))
    assert torch.equal(fused.dequantized_weight(), torch.cat([p.dequantized_weight() for p in (q, k, v)]))
    x = torch.randn(4, 256)
    parts = torch.cat([p(x) for p in (q, k, v)], dim=-1)
    torch.testing.assert_close(fused(x), parts, rtol=1e-6, atol=1e-6)
    # The last part may end in a ragged block; any other part may not (its block row would be shared).
    assert concat_fp8_linears([q, _fp8_linear(100, 256, (128, 128), seed=1)]) is not None
    assert concat_fp8_linears([_fp8_linear(320, 256, (128, 128), seed=1), q]) is None
    assert concat_fp8_linears([q, _fp8_linear(128, 256, (128, 256), seed=1)]) is None  # different blocks
    assert concat_fp8_linears([q, _fp8_linear(128, 256, (128, 128), seed=1, bias=True)]) is None
    per_row = [_fp8_linear(n, 256, (1, 256), seed=n) for n in (100, 30)]  # per-channel rows always concatenate
    assert concat_fp8_linears(per_row) is not None


# ---- which path ----
def test_path_choice(monkeypatch):
    block = FP8Config((128, 128))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(FP8_NATIVE_ENV, raising=False)
    assert choose_fp8_path(block, cpu) == (False, "device cpu is not a CUDA GPU")
    native, why = choose_fp8_path(block, cuda)
    assert native == NATIVE_GPU and (native or why)
    assert choose_fp8_path(block, cuda, tp_size=2)[0] is False
    assert "multiple of 128" in choose_fp8_path(FP8Config((64, 64)), cuda)[1]
    monkeypatch.setenv(FP8_NATIVE_ENV, "0")
    assert choose_fp8_path(block, cuda) == (False, f"{FP8_NATIVE_ENV}=0")
    monkeypatch.setenv(FP8_NATIVE_ENV, "1")
    assert choose_fp8_path(block, cpu)[0] is True  # the reference math on the CPU, for tests
    assert choose_fp8_path(FP8Config(None), cpu)[0] is True
    with pytest.raises(WeightsError, match=r"DOCKYARD_FP8_NATIVE=1 asks for native FP8 matmuls, but tensor parallel"):
        choose_fp8_path(block, cpu, tp_size=2)
    with pytest.raises(WeightsError, match=r"weight_block_size \[64, 64\]"):
        choose_fp8_path(FP8Config((64, 64)), cpu)
    monkeypatch.setenv(FP8_NATIVE_ENV, "maybe")
    with pytest.raises(WeightsError, match=r"DOCKYARD_FP8_NATIVE='maybe' is not one of auto, 0, 1"):
        choose_fp8_path(block, cpu)


# ---- whole models ----
def _logits(llm: LLM) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([llm.model.compute_logits(llm.model(torch.tensor(ids, device=llm.device),
                                                             torch.arange(len(ids), device=llm.device))).float()
                          for ids in PROMPTS]).cpu()


def _llm(path, monkeypatch, native: str, device: str = "cpu", dtype: str = "float32") -> LLM:
    monkeypatch.setenv(FP8_NATIVE_ENV, native)
    return LLM(path, dtype=dtype, device=device, num_kv_blocks=16, max_num_seqs=4)


@pytest.mark.parametrize("kind", ["block", "rows"])
def test_native_load_keeps_the_checkpoint_bytes(checkpoints, monkeypatch, kind):  # noqa: F811
    from safetensors.torch import load_file

    path = getattr(checkpoints, kind)
    native = _llm(path, monkeypatch, "1")  # the native layout on the CPU: Fp8Linear's PyTorch math
    dequant = _llm(path, monkeypatch, "0")
    assert uses_native_fp8(native.model) and not uses_native_fp8(dequant.model)
    assert native.load_report.missing == native.load_report.unexpected == []
    stored = load_file(str(path / "model.safetensors"))
    modules = dict(native.model.named_modules())
    for name in checkpoints.quantized:
        layer = modules[name[: -len(".weight")]]
        assert isinstance(layer, Fp8Linear), name
        assert torch.equal(layer.weight.view(torch.uint8), stored[name].view(torch.uint8)), name
        scale = stored.get(name + "_scale_inv", stored.get(name + "_scale"))
        want = scale if kind == "block" else scale.reshape(-1, 1).expand(layer.out_features, 1)
        assert torch.equal(layer.weight_scale_inv, want.float()), name
    assert type(native.model.lm_head) is nn.Linear and native.model.lm_head.weight.dtype == torch.float32
    # The two paths differ by the activations' e4m3 rounding: per matmul input an rms relative error of
    # ~0.027, as for the weights (tests/weights/test_fp8.py), so the same bound holds.
    ratio = rel_rmse(_logits(native), _logits(dequant))
    print(f"{kind}: native (CPU reference math) vs dequantized logits: rmse ratio {ratio:.4f} (bound {LOGITS_BOUND})")
    assert 0 < ratio < LOGITS_BOUND
    if kind == "block":  # q/k/v (256, 128, 128 rows) fuse exactly; gate/up (320 rows: a ragged block) stay apart
        before = _logits(native)
        native.model.fuse_projections()
        layer0 = native.model.model.layers[0]
        assert isinstance(layer0.self_attn.qkv_proj, Fp8Linear) and not hasattr(layer0.self_attn, "q_proj")
        assert isinstance(layer0.mlp.gate_proj, Fp8Linear) and not hasattr(layer0.mlp, "gate_up_proj")
        torch.testing.assert_close(_logits(native), before, rtol=1e-5, atol=1e-5)


@needs_fp8_gpu
def test_native_matches_dequantized_on_gpu(checkpoints, monkeypatch):  # noqa: F811
    """The whole tiny model on the GPU, bfloat16, the FP8 kernels (and fused q/k/v) vs dequantize-on-load.
    Bound: as above, plus bfloat16's own rounding (~2^-9 per value), far below it."""
    native = _llm(checkpoints.block, monkeypatch, "auto", device="cuda", dtype="bfloat16")
    dequant = _llm(checkpoints.block, monkeypatch, "0", device="cuda", dtype="bfloat16")
    assert uses_native_fp8(native.model) and not uses_native_fp8(dequant.model)
    assert isinstance(native.model.model.layers[0].self_attn.qkv_proj, Fp8Linear)
    ratio = rel_rmse(_logits(native), _logits(dequant))
    print(f"GPU native vs dequantized logits: rmse ratio {ratio:.4f} (bound {LOGITS_BOUND})")
    assert 0 < ratio < LOGITS_BOUND
    # and the kernels agree with the module's PyTorch math on the CPU, same weights, bfloat16: the two
    # runs differ only by bfloat16 roundings (other attention/norm backends), each of which may flip an
    # activation's e4m3 rounding (2^-4 of that value), so a few percent at most, far from a wrong scale (~1)
    cpu = _llm(checkpoints.block, monkeypatch, "1", dtype="bfloat16")
    assert rel_rmse(_logits(native), _logits(cpu)) < 0.03
