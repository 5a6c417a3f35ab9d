"""MXFP4 (gpt-oss's published layout) loads, dequantized or kept as stored: a shrunken gpt-oss written in the test.

The packer here follows the format's definition in float64/integer math (e2m1 values from their sign,
exponent and mantissa bits; e8m0 scales as 2^(s - 127); two nibbles per byte, the low one first; each
expert bank stored [E, out, in] with the blocks along ``in``). The expert weights are drawn on the
MXFP4 grid, so the float64 weights the HF model holds are exactly what the checkpoint stores; HF
transformers' own MXFP4 loader (dequantizing on CPU) reads the same files as a second reference.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dockyard import LLM
from dockyard.errors import WeightsError
from dockyard.memory import MXFP4_HELD, plan_memory, storage_of
from dockyard.model_source import resolve_model
from dockyard.onboard.config_features import detect_features
from dockyard.onboard.config_surgery import shrink_config
from dockyard.onboard.equivalence import build_reference
from dockyard.onboard.quantization import quantization_verdict
from dockyard.ops.moe import GptOssExperts, mxfp4_expert_banks
from dockyard.ops.quant_linear import QUANT_NATIVE_ENV
from dockyard.run_plan import RunTarget, plan_for_run
from dockyard.testing import paged_logits, rel_rmse
from dockyard.weights.dummy import iter_dummy
from dockyard.weights.mxfp4 import MXFP4_KEPT_BY_DEFAULT, MXFP4_KERNEL_CAPABILITY, choose_mxfp4_path, dequantize_mxfp4
from tests.shared_configs import shared_config

transformers = pytest.importorskip("transformers")


def e2m1(code: int) -> float:
    """An FP4 nibble's value: sign bit, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 subnormal."""
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    return sign * (mantissa / 2 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1))


E2M1 = torch.tensor([e2m1(c) for c in range(16)], dtype=torch.float64)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Nibble codes [..., K] → bytes [..., K / 32, 16], element 2j in the low nibble of byte j."""
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.reshape(*codes.shape[:-1], codes.shape[-1] // 32, 16).contiguous()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder of the MXFP4 checkpoint, the HF model holding the same weights, its config)."""
    config = shared_config("openai--gpt-oss-20b")
    small, _ = shrink_config(config)
    small["architectures"] = config["architectures"]
    ref = build_reference(small)
    gen = torch.Generator().manual_seed(0)
    packed = {}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                experts, k, n = p.shape  # the model's [E, in, out]; stored [E, out, in]
                codes = torch.randint(0, 16, (experts, n, k), generator=gen, dtype=torch.uint8)
                scales = torch.randint(123, 129, (experts, n, k // 32), generator=gen, dtype=torch.uint8)
                weight = E2M1[codes.long()] * torch.pow(2.0, scales.double() - 127).repeat_interleave(32, dim=-1)
                p.copy_(weight.transpose(1, 2))
                packed[name + "_blocks"], packed[name + "_scales"] = pack(codes), scales
    folder = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    ref.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    save_file({**tensors, **packed}, folder / "model.safetensors", metadata={"format": "pt"})
    saved = json.loads((folder / "config.json").read_text())
    saved["quantization_config"] = config["quantization_config"]  # the published one, modules_to_not_convert too
    (folder / "config.json").write_text(json.dumps(saved))
    return folder, ref, small


def test_mxfp4_checkpoint_loads_and_equals_hf(checkpoint):
    folder, ref, small = checkpoint
    ids = torch.randint(0, small["vocab_size"], (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    llm = LLM(str(folder), dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 24)
    assert llm.source.quantization == "mxfp4"
    got = paged_logits(llm.model, ids.tolist(), [24])  # the loaded weights, not chunking (tests/models)
    assert rel_rmse(got, expected) <= 1e-5
    # HF transformers' MXFP4 loader on the same files (it dequantizes on CPU) agrees with the weights.
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager")
    with torch.no_grad():
        assert rel_rmse(hf(ids[None]).logits[0], expected) <= 1e-5


def test_unpaired_or_misshapen_blocks_are_named(checkpoint):
    folder = checkpoint[0]
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.experts.down_proj"
    without_scales = [(k, v) for k, v in tensors.items() if k != name + "_scales"]
    with pytest.raises(WeightsError, match=rf"{name}_scales"):
        list(dequantize_mxfp4(without_scales, torch.float32))
    wrong = [(name + "_blocks", tensors[name + "_blocks"]), (name + "_scales", tensors[name + "_scales"][..., :1])]
    with pytest.raises(WeightsError, match="do not form MXFP4 blocks"):
        list(dequantize_mxfp4(wrong, torch.float32))



def _expert_parameters(llm) -> dict[str, torch.Tensor]:
    return {n: p for n, p in llm.model.named_parameters() if ".mlp.experts." in n and not n.endswith("_bias")}


def test_mxfp4_experts_kept_as_stored_on_cpu(checkpoint, monkeypatch):
    """DOCKYARD_QUANT_NATIVE=1 keeps the experts as the checkpoint's bytes on a CPU too (the reference loop
    dequantizes one expert per call): the same logits as HF on the float64 weights. (dockyard's own gpt-oss
    classes: the config transformers saves has a key they do not read, which would pick the generic path.)"""
    folder, ref, small = checkpoint
    monkeypatch.setenv(QUANT_NATIVE_ENV, "1")
    llm = LLM(str(folder), dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 24,
              model_impl="dockyard")
    stored = load_file(folder / "model.safetensors")
    experts = _expert_parameters(llm)
    assert experts and all(n.endswith(("_blocks", "_scales")) for n in experts)
    assert all(torch.equal(p, stored[n]) for n, p in experts.items())
    ids = torch.randint(0, small["vocab_size"], (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    assert rel_rmse(paged_logits(llm.model, ids.tolist(), [20, 4]), expected) <= 1e-5


def test_mxfp4_path_choice(monkeypatch):
    monkeypatch.delenv(QUANT_NATIVE_ENV, raising=False)
    assert choose_mxfp4_path(torch.device("cuda"), assume_gpu=True)[0] == MXFP4_KEPT_BY_DEFAULT
    assert not choose_mxfp4_path(torch.device("cpu"))[0]
    monkeypatch.setenv(QUANT_NATIVE_ENV, "0")
    assert not choose_mxfp4_path(torch.device("cuda"), assume_gpu=True)[0]
    monkeypatch.setenv(QUANT_NATIVE_ENV, "1")
    assert choose_mxfp4_path(torch.device("cuda"), assume_gpu=True)[0]
    assert choose_mxfp4_path(torch.device("cpu"))[0]
    with pytest.raises(WeightsError, match="tensor_parallel_size=2"):
        choose_mxfp4_path(torch.device("cuda"), tp_size=2)
    monkeypatch.setenv(QUANT_NATIVE_ENV, "sometimes")
    with pytest.raises(WeightsError, match=QUANT_NATIVE_ENV):
        choose_mxfp4_path(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < MXFP4_KERNEL_CAPABILITY,
                    reason="the MXFP4 fused MoE path runs on a Hopper GPU")
def test_mxfp4_gpu_logits_kept_vs_dequantized(checkpoint, monkeypatch):
    """On the GPU (bfloat16) the experts kept MXFP4 in the fused kernel (DOCKYARD_QUANT_NATIVE=1): logits within
    the error of the dequantized path (DOCKYARD_QUANT_NATIVE=0), both against HF on the float64 weights."""
    folder, ref, small = checkpoint
    ids = torch.randint(0, small["vocab_size"], (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    monkeypatch.setenv(QUANT_NATIVE_ENV, "1")
    kept = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_memory_bytes=1 << 24,
              model_impl="dockyard")
    assert all(p.dtype == torch.uint8 for p in _expert_parameters(kept).values())
    got_kept = paged_logits(kept.model, ids.tolist(), [20, 4]).float().cpu()
    del kept
    monkeypatch.setenv(QUANT_NATIVE_ENV, "0")
    dense = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_memory_bytes=1 << 24,
              model_impl="dockyard")
    assert all(p.dtype == torch.bfloat16 for p in _expert_parameters(dense).values())
    got_dense = paged_logits(dense.model, ids.tolist(), [20, 4]).float().cpu()
    error_kept, error_dense = rel_rmse(got_kept, expected), rel_rmse(got_dense, expected)
    print(f"rel rmse vs HF float64 weights: MXFP4 kept {error_kept:.2e}, dequantized {error_dense:.2e}; "
          f"kept vs dequantized {rel_rmse(got_kept, got_dense):.2e}")
    assert error_kept <= 1.5 * error_dense + 1e-3
    assert rel_rmse(got_kept, got_dense) <= 2e-2


def test_plan_counts_mxfp4_experts_at_packed_size(tmp_path, monkeypatch):
    """gpt-oss-20b's config planned for a GPU elsewhere with the experts kept MXFP4: their bytes are 17/32 of one
    per weight (a half byte per nibble, one scale byte per 32), counted here from the config by hand."""
    monkeypatch.setenv(QUANT_NATIVE_ENV, "1")
    config = shared_config("openai--gpt-oss-20b")
    (tmp_path / "config.json").write_text(json.dumps(config))
    source = resolve_model(tmp_path)
    gpu = plan_for_run(source, RunTarget("cuda", present=False))[0]
    cpu = plan_for_run(source, RunTarget("cpu", present=True))[0]
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    experts = config["num_hidden_layers"] * config["num_local_experts"] * (hidden * 2 * inter + inter * hidden)
    assert gpu.weight_bytes_by_dtype[MXFP4_HELD] == experts * 17 // 32
    dense_gpu = plan_memory(source.spec, torch.bfloat16, storage=storage_of(source, mxfp4_experts=False))
    assert dense_gpu.weight_bytes - gpu.weight_bytes == experts * 2 - experts * 17 // 32
    assert "MXFP4 experts kept as stored" in gpu.weight_format
    assert MXFP4_HELD in cpu.weight_bytes_by_dtype  # forced on a CPU too
    features = detect_features(config)
    assert quantization_verdict(source, features, gpu, RunTarget("cuda", present=False))["handling"] == "native"
    monkeypatch.setenv(QUANT_NATIVE_ENV, "auto")
    default = plan_for_run(source, RunTarget("cuda", present=False))[0]
    assert (MXFP4_HELD in default.weight_bytes_by_dtype) == MXFP4_KEPT_BY_DEFAULT
    monkeypatch.setenv(QUANT_NATIVE_ENV, "0")
    dense = plan_for_run(source, RunTarget("cuda", present=False))[0]
    assert MXFP4_HELD not in dense.weight_bytes_by_dtype and "dequantized to bfloat16" in dense.weight_format
    assert quantization_verdict(source, features, dense, RunTarget("cuda", present=False))["handling"] == "dequantized"


def test_dummy_mxfp4_experts_have_the_dense_dummies_scale():
    """Dummy weights for experts held MXFP4: random nibbles (all 16 codes) with one scale whose decoded values have
    the root-mean-square 1/sqrt(K) dense dummy matrices have (decoded by this test's own e2m1 table)."""
    with mxfp4_expert_banks():
        bank = GptOssExperts(4, 64, 96, limit=7.0)
    tensors = dict(iter_dummy(bank))
    for name, k in (("gate_up_proj", 64), ("down_proj", 96)):
        blocks, scales = tensors[name + "_blocks"], tensors[name + "_scales"]
        assert blocks.dtype == scales.dtype == torch.uint8 and blocks.shape == getattr(bank, name + "_blocks").shape
        codes = torch.stack([blocks & 15, blocks >> 4], dim=-1).reshape(*scales.shape, 32).long()
        assert torch.bincount(codes.reshape(-1), minlength=16).min() > 0
        values = E2M1[codes] * torch.pow(2.0, scales.double() - 127)[..., None]
        rms = values.pow(2).mean().sqrt().item()
        assert 0.7 < rms * k**0.5 < 1.4, rms
