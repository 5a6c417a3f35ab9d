"""FP8 (e4m3) KV cache: quantized writes, the reference and Triton reads, against float64.

The reference decodes the cache's bytes with the e4m3 bit layout written out here (sign, 4
exponent bits with bias 7, 3 mantissa bits, subnormals at exponent 0, 0x7f/0xff NaN), never with
torch's float8 conversion, and attends in float64 over those values times the scales. The Triton
kernels run in the interpreter on a machine without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from dockyard.ops import fp8_kv
from dockyard.ops.attention import Attention, AttentionMetadata, paged_attention, write_kv_cache
from tests.helpers import import_kernels
from tests.ops.test_triton_attention import _interpreter  # noqa: F401 - the autouse interpreter fixture

triton = pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = DEVICE.type == "cpu"
ta = import_kernels("dockyard.ops.triton_attention", INTERPRET)
tf = import_kernels("dockyard.ops.triton_fused", INTERPRET)
BS = 16


def e4m3_value(byte: int) -> float:
    """The value of one float8_e4m3fn byte, from the format's definition."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


E4M3_TABLE = torch.tensor([e4m3_value(b) for b in range(256)], dtype=torch.float64)
E4M3_GRID = torch.unique(E4M3_TABLE[~torch.isnan(E4M3_TABLE)])


def decode(cache: torch.Tensor) -> torch.Tensor:
    """float64 values of an FP8 tensor, from its bytes."""
    return E4M3_TABLE[cache.cpu().view(torch.uint8).long()]


def test_quantize_is_nearest_e4m3_value_and_saturates():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=gen) * 3, torch.tensor([1000.0, -1000.0, 0.0, 1e-4])])
    scale = torch.tensor(0.05)
    got = decode(fp8_kv.quantize(x, scale))
    target = (x.double() / 0.05).clamp(-448, 448)
    nearest_distance = (E4M3_GRID[None, :] - target[:, None]).abs().min(dim=1).values
    assert torch.equal((got - target).abs(), nearest_distance)  # a nearest grid value (ties either way)
    assert got[-4:-2].tolist() == [448.0, -448.0]


def build(seq_lens, num_q_heads, num_kv_heads, head_dim, seed=0):
    """q, a float KV pool written into an FP8 cache through write_kv_cache, its scales and metadata."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // BS) for n in seq_lens]
    num_blocks = sum(needed) + 3
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[pool.pop() for _ in range(nb)] + [0] * (max(needed) - nb) for nb in needed]
    slots = torch.tensor([tables[i][p // BS] * BS + p % BS for i, n in enumerate(seq_lens) for p in range(n)])
    k = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen) * 4
    v = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)
    k_scale, v_scale = fp8_kv.calibration_scale(k, 200.0), fp8_kv.calibration_scale(v, 100.0)
    cache = torch.zeros(2, num_blocks, BS, num_kv_heads, head_dim, dtype=fp8_kv.FP8_DTYPE)
    write_kv_cache(k, v, cache, slots, k_scale, v_scale)
    q = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen)
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(seq_lens), dtype=torch.long),
                             block_tables=torch.tensor(tables), query_lens=[1] * len(seq_lens),
                             seq_lens=list(seq_lens), block_size=BS, seq_lens_tensor=torch.tensor(seq_lens))
    return q, cache, k_scale, v_scale, meta, (k, v)


def float64_decode(q, cache, k_scale, v_scale, meta, scale, sinks=None):
    """Each query over its dequantized context, softmax in float64 (sinks join the denominator)."""
    keys, values = decode(cache[0]) * float(k_scale), decode(cache[1]) * float(v_scale)
    out = []
    for i, n in enumerate(meta.seq_lens):
        blocks = meta.block_tables[i, : -(-n // BS)]
        k = keys[blocks].reshape(-1, *keys.shape[-2:])[:n]
        v = values[blocks].reshape(-1, *values.shape[-2:])[:n]
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = torch.einsum("hd,lhd->hl", q[i].double(), k) * scale
        if sinks is not None:
            s = torch.cat([s, sinks.double()[:, None]], dim=1)
        p = torch.softmax(s, dim=1)[:, :n]
        out.append(torch.einsum("hl,lhd->hd", p, v))
    return torch.stack(out)


SEQ_LENS = [1, 16, 45, 83]


def test_write_stores_values_over_scale():
    q, cache, k_scale, v_scale, meta, (k, v) = build(SEQ_LENS, 4, 2, 32)
    keys = decode(cache[0]).reshape(-1, 2, 32)
    slots = torch.cat([meta.block_tables[i, p // BS] * BS + p % BS for i, n in enumerate(SEQ_LENS)
                       for p in torch.arange(n)[None]])
    stored = keys[slots] * float(k_scale)
    # e4m3 rounds to 3 mantissa bits: each value within half a step (2^-4 relative) of the original.
    assert ((stored - k.double()).abs() <= k.double().abs() * 2**-4 + float(k_scale) * 2**-10).all()


@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(4, 4), (8, 2)])
def test_reference_paths_read_fp8_cache(num_q_heads, num_kv_heads):
    q, cache, k_scale, v_scale, meta, _ = build(SEQ_LENS, num_q_heads, num_kv_heads, 32, seed=num_q_heads)
    expected = float64_decode(q, cache, k_scale, v_scale, meta, 32**-0.5)
    batched = paged_attention(q, cache, meta, 32**-0.5, k_scale=k_scale, v_scale=v_scale)  # decode-only: batched
    meta.seq_lens_tensor = None  # one sequence at a time
    single = paged_attention(q, cache, meta, 32**-0.5, k_scale=k_scale, v_scale=v_scale)
    for got in (batched, single):
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(("num_splits", "with_sinks", "block_n"),
                         [(1, False, None), (1, True, None), (3, False, None), (3, True, None), (2, False, 128)])
def test_triton_kernel_reads_fp8_cache(num_splits, with_sinks, block_n):
    q, cache, k_scale, v_scale, meta, _ = build(SEQ_LENS, 8, 2, 64, seed=num_splits)
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(1)) if with_sinks else None
    expected = float64_decode(q, cache, k_scale, v_scale, meta, 0.125, sinks)
    dev = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    got = ta.paged_decode_attention(dev(q), dev(cache), dev(meta.block_tables), dev(meta.seq_lens_tensor), 0.125,
                                    sinks=dev(sinks), num_splits=num_splits, block_n=block_n, k_scale=dev(k_scale),
                                    v_scale=dev(v_scale))
    torch.testing.assert_close(got.cpu().double(), expected, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        ta.paged_decode_attention(dev(q), dev(cache), dev(meta.block_tables), dev(meta.seq_lens_tensor), 0.125)


def test_fused_rotary_write_quantizes_like_the_reference_write():
    gen = torch.Generator().manual_seed(3)
    tokens, heads, dim = 5, 2, 32
    q = torch.randn(tokens, 4, dim, generator=gen)
    k = torch.randn(tokens, heads, dim, generator=gen) * 3
    v = torch.randn(tokens, heads, dim, generator=gen)
    positions = torch.tensor([0, 3, 7, 8, 20])
    angles = torch.arange(32)[:, None].float() * torch.rand(dim // 2, generator=gen)[None]
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([4, 9, 17, 30, 31])
    k_scale, v_scale = torch.tensor(0.02), torch.tensor(0.007)
    fused = torch.zeros(2, 2, BS, heads, dim, dtype=fp8_kv.FP8_DTYPE)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    fused_dev = dev(fused)
    tf.rotary_and_write_kv(dev(q.clone()), dev(k.clone()), dev(v), dev(positions), dev(cos), dev(sin), dim,
                           fused_dev, dev(slots), dev(k_scale), dev(v_scale))
    # The reference: NeoX rotation in float64, then the reference write.
    c, s = cos[positions][:, None].double(), sin[positions][:, None].double()
    k1, k2 = k.double().chunk(2, dim=-1)
    rotated = torch.cat([k1 * c - k2 * s, k2 * c + k1 * s], dim=-1).float()
    expected = torch.zeros_like(fused)
    write_kv_cache(rotated, v, expected, slots, k_scale, v_scale)
    for part in (0, 1):
        got, want = decode(fused_dev[part]), decode(expected[part])
        checked = torch.ones_like(want, dtype=torch.bool)
        if INTERPRET:
            # Triton's interpreter rounds float32 → e4m3 without carrying a rounded-up mantissa into the
            # exponent (31.9 → 16, not 32); the GPU's conversion instruction does. There, the values that
            # round up to a power of two are left out.
            checked = want.abs().log2() % 1 != 0
        # The kernel's float32 rotation may put a key on the other side of a rounding midpoint: one step.
        step = want.abs() * 2**-3 + 2**-9 if part == 0 else 0.0
        assert ((got - want).abs() <= step)[checked].all()


def test_attention_layer_calibrates_then_writes_with_its_scales():
    layer = Attention(num_heads=2, head_dim=16, num_kv_heads=2, scale=0.25)
    k, v = torch.full((3, 2, 16), 4.0), torch.full((3, 2, 16), -2.0)
    layer.observe_kv(k, v)  # outside a calibration pass: nothing
    assert layer.kv_scale_source == "default"
    with fp8_kv.calibration():
        layer.observe_kv(k, v)
        layer.observe_kv(k / 4, v / 4)  # a smaller maximum later does not lower the scales
    assert layer.kv_scale_source == "calibrated"
    assert float(layer.k_scale) == pytest.approx(4.0 / fp8_kv.K_SCALE_HEADROOM)
    assert float(layer.v_scale) == pytest.approx(2.0 / fp8_kv.V_SCALE_HEADROOM)
    layer.set_kv_scales(0.5, 0.25, source="checkpoint")
    with fp8_kv.calibration():
        layer.observe_kv(k * 100, v * 100)  # checkpoint scales are kept
    assert (float(layer.k_scale), float(layer.v_scale)) == (0.5, 0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphs_equal_eager_with_fp8_cache(tmp_path):
    """Greedy tokens of a padded batch with captured decode graphs equal eager mode's, both with an FP8
    cache (float32 model, so only the cache's rounding differs from test_cuda_graphs' run)."""
    import random

    from dockyard import LLM, SamplingParams
    from tests.engine.test_cuda_graphs import _tiny_llama

    model = _tiny_llama(tmp_path)
    kwargs = dict(load_format="dummy", device="cuda", dtype="float32", max_num_seqs=8, seed=3,
                  num_kv_blocks=256, kv_cache_dtype="fp8")
    graphs, eager = LLM(model, **kwargs), LLM(model, enforce_eager=True, **kwargs)
    assert graphs.engine.runner.graphs is not None, graphs.engine.runner.eager_reason
    assert graphs.engine.runner.kv_cache.dtype == fp8_kv.FP8_DTYPE
    layers = graphs.engine.runner.attention_layers
    assert all(m.kv_scale_source == "calibrated" for m in layers)
    assert [float(m.k_scale) for m in layers] == [float(m.k_scale) for m in eager.engine.runner.attention_layers]
    rng = random.Random(0)
    prompts = [[rng.randrange(1024) for _ in range(n)] for n in (5, 17, 40, 3, 90)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    a, b = graphs.generate(prompts, params, use_tqdm=False), eager.generate(prompts, params, use_tqdm=False)
    assert [x.outputs[0].token_ids for x in a] == [y.outputs[0].token_ids for y in b]


def test_generic_path_calibrates_and_reads_an_fp8_cache(tmp_path):
    """transformers' own modules (the generic path) write and read the FP8 cache through the same slot: logits
    of chunked prefill + decodes stay within the onboarding bound of HF's own forward."""
    transformers = pytest.importorskip("transformers")
    from dockyard import LLM
    from dockyard.onboard.gates.features.fp8_kv import FP8_KV_LOGITS_BOUND
    from dockyard.testing import paged_logits, rel_rmse
    from tests.models.test_generic import TINY_SIZES

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("gpt_neox", **TINY_SIZES)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    reference.save_pretrained(tmp_path)
    llm = LLM(tmp_path, device="cpu", num_kv_blocks=64, kv_cache_dtype="fp8")
    assert llm.spec.model_impl == "transformers" and llm.engine.runner.kv_cache.dtype == fp8_kv.FP8_DTYPE
    assert {m.kv_scale_source for m in llm.engine.runner.attention_layers} == {"calibrated"}
    ids = torch.randint(0, TINY_SIZES["vocab_size"], (14,), generator=torch.Generator().manual_seed(2))
    got = paged_logits(llm.model, ids.tolist(), [10, 1, 1, 1, 1], kv_cache_dtype=fp8_kv.FP8_DTYPE)
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    assert 0 < rel_rmse(got, expected) < FP8_KV_LOGITS_BOUND


def test_mla_and_tensor_parallel_refuse_an_fp8_cache_before_loading(tmp_path):
    from dockyard import LLM
    from dockyard.errors import ConfigError
    from tests.engine.test_cuda_graphs import _tiny_dense_mla, _tiny_llama

    (tmp_path / "mla").mkdir()
    with pytest.raises(ConfigError, match="one latent per token"):
        LLM(_tiny_dense_mla(tmp_path / "mla"), load_format="dummy", device="cpu", kv_cache_dtype="fp8")
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 is not supported yet"):
        LLM(_tiny_llama(tmp_path), load_format="dummy", device="cpu", kv_cache_dtype="fp8_e4m3",
            tensor_parallel_size=2)


def test_fp8_value_tile_is_not_read_bytewise_from_shared_memory():
    """Compiled for Hopper (no GPU needed): the FP8 kernel stages its value tile as 16-bit values, read back with the
    transposing matrix load like the bf16 kernel's, never one byte per load (what the compiler does when the
    conversion is left next to the product: benchmarks/RESULTS.md, session 8)."""
    kernel_sass = pytest.importorskip("dockyard.bench.kernel_sass")
    ptx = kernel_sass.compile_decode("fp8e4nv", "bf16", block_n=64, num_warps=4, num_stages=3).asm["ptx"]
    assert kernel_sass.ptx_count(ptx, "ld.shared.b8") == 0
    assert kernel_sass.ptx_count(ptx, "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16") > 0
