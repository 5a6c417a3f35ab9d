"""int4 checkpoints (AWQ, GPTQ with and without desc_act, compressed-tensors pack-quantized) load on the CPU.

Each checkpoint is written from random 4-bit codes, scales and zero points by an independent packer
(``tests/weights/int4_packers.py``): AWQ's and GPTQ's published packing (AutoAWQ's GEMM order, AutoGPTQ's
row packing and v1 "zero - 1" zero points) in plain integer arithmetic, and compressed-tensors' own
``pack_to_int32``. The reference weight is ``(q - zero) * scale`` in float64 with the group of each input
row taken from the packer's own ``g_idx``. A shrunken Llama's logits are compared with HF transformers
running those float64 weights in float64; a shrunken Qwen3-MoE (every expert quantized) with the same
model loaded from the float64 weights rounded to float32. Scales are float16, so ``(q - zero) * scale`` is
exact in float32: loaded weights must equal the reference exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from dockyard.engine.llm import LLM
from dockyard.errors import WeightsError
from dockyard.memory import storage_of
from dockyard.model_source import resolve_model
from dockyard.ops.quant_format import Int4Weight, dequantize_int4
from dockyard.weights.int4 import checkpoint_int4_weights, read_int4
from dockyard.weights.quant_config import Int4Config
from dockyard.weights.safetensors_dir import iter_safetensors
from tests.helpers import rel_rmse, save_tiny_hf_model, unit_scale_llama, unit_scale_state
from tests.weights.int4_packers import (
    MOE_VARIANTS,
    VARIANTS,
    ct_config,
    ct_tensors,
    draw_int4,
    gptq_tensors,
    quant_config,
    write_int4,
)
from tests.weights.test_fp8_moe import CONFIG as QWEN3_MOE_CONFIG

PROMPTS = [[1, 17, 300, 42, 7, 511, 256, 3], [5, 9, 2, 88, 101, 400, 33, 12, 64, 128, 200, 6]]
LOGITS_BOUND = 1e-5  # float32 compute against float64 on exactly the same weights
MOE_CONFIG = QWEN3_MOE_CONFIG  # hidden 256, 4 experts of 192 (the FP8 MoE test's)


def _logits(llm: LLM) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([llm.model.compute_logits(llm.model(torch.tensor(ids), torch.arange(len(ids)))).double()
                          for ids in PROMPTS])


def _llm(path: Path) -> LLM:
    return LLM(path, dtype="float32", device="cpu", num_kv_blocks=16, max_num_seqs=2)


def _check_weights(llm: LLM, refs: dict[str, torch.Tensor]) -> None:
    params = dict(llm.model.named_parameters())
    for name, ref in refs.items():
        assert torch.equal(params[name].detach(), ref.float()), name


# ---- a shrunken Llama against HF transformers in float64 ----

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4")
    hf = unit_scale_llama(intermediate_size=384)
    src = save_tiny_hf_model(hf, root / "fp32")
    return SimpleNamespace(root=root, hf=hf, state=load_file(str(src / "model.safetensors")),
                           config=json.loads((src / "config.json").read_text()))


def _hf_float64_logits(hf: transformers.PreTrainedModel, refs: dict[str, torch.Tensor]) -> torch.Tensor:
    model = hf.to(torch.float64)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, ref in refs.items():
            params[name].copy_(ref)
        return torch.cat([model(torch.tensor([ids])).logits[0] for ids in PROMPTS])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_int4_checkpoint_matches_float64_reference(llama, variant):
    refs = write_int4(llama.root / variant, llama.config, llama.state, variant, torch.Generator().manual_seed(1))
    assert len(refs) == 2 * 7
    llm = _llm(llama.root / variant)
    assert llm.source.quantization == VARIANTS[variant][0]
    assert llm.load_report.missing == llm.load_report.unexpected == []
    _check_weights(llm, refs)
    ratio = rel_rmse(_logits(llm), _hf_float64_logits(llama.hf, refs))
    print(f"{variant}: int4 logits vs HF float64 on the reference dequantization: rmse ratio {ratio:.2e}")
    assert ratio <= LOGITS_BOUND


def test_compressed_tensors_checkpoint_as_transformers_loads_it(llama):
    """transformers (with the compressed-tensors package) decompresses the same checkpoint itself. (Symmetric:
    transformers 5.x with compressed-tensors 0.20 sizes an asymmetric module's zero point unpacked, [N, G], and
    refuses the packed [N/8, G] that compressed-tensors itself writes.)"""
    variant = "ct-sym-g128"
    path = llama.root / "ct-hf"
    write_int4(path, llama.config, llama.state, variant, torch.Generator().manual_seed(1))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        expected = torch.cat([hf(torch.tensor([ids])).logits[0].double() for ids in PROMPTS])
    ratio = rel_rmse(_logits(_llm(path)), expected)
    print(f"compressed-tensors int4 vs transformers' own decompression: rmse ratio {ratio:.2e}")
    assert ratio <= LOGITS_BOUND


def test_kept_int4_weights_carry_the_format(llama):
    """``keep_quantized`` hands the kernels the Int4Weight; its meaning is the float64 reference."""
    variant = "gptq-asym-desc_act-g64"
    path = llama.root / "kept"
    refs = write_int4(path, llama.config, llama.state, variant, torch.Generator().manual_seed(2))
    source = resolve_model(path)
    assert checkpoint_int4_weights(path, source.int4) == set(refs)  # from the headers: what may be kept
    assert storage_of(source).describe(torch.float32) == "int4 (gptq) dequantized to float32 on load"
    keep = {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    out = dict(read_int4(iter_safetensors(path), source.int4, torch.float32, keep))
    for name in keep:
        weight = out[name]
        assert isinstance(weight, Int4Weight) and weight.group_size == 64 and weight.perm is not None
        assert weight.zeros is not None and weight.scales.dtype == torch.float16
        assert torch.equal(dequantize_int4(weight), refs[name].float())
    assert all(isinstance(t, torch.Tensor) for n, t in out.items() if n not in keep)


# ---- a shrunken Qwen3-MoE: every expert quantized, dequantized on load ----

@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4moe")
    state = unit_scale_state(MOE_CONFIG, root / "shapes")
    return SimpleNamespace(root=root, state=state)


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_qwen3_moe_int4_experts_dequantized_on_load(moe, variant):
    refs = write_int4(moe.root / variant, MOE_CONFIG, moe.state, variant, torch.Generator().manual_seed(3))
    assert sum(".mlp.experts." in n for n in refs) == 2 * 4 * 3
    dense = dict(moe.state, **{n: r.float() for n, r in refs.items()})
    (moe.root / f"{variant}-ref").mkdir()
    (moe.root / f"{variant}-ref" / "config.json").write_text(json.dumps(MOE_CONFIG))
    save_file(dense, str(moe.root / f"{variant}-ref" / "model.safetensors"))
    llm = _llm(moe.root / variant)
    _check_weights(llm, refs)
    ratio = rel_rmse(_logits(llm), _logits(_llm(moe.root / f"{variant}-ref")))
    assert ratio <= LOGITS_BOUND


# ---- strict pairing and refusals ----

def _stream(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return list(tensors.items())


@pytest.fixture(scope="module")
def gptq_module() -> dict[str, torch.Tensor]:
    d = draw_int4(16, 64, 32, False, False, torch.Generator().manual_seed(4), min_zero=1)
    return {f"layer.q_proj.{k}": v for k, v in gptq_tensors(d).items()}


def _gptq_config(**change) -> Int4Config:
    return Int4Config.from_quantization_config(dict(quant_config("gptq", 32, False, False, True), **change), "test")


def test_pieces_pair_in_any_order_with_plain_tensors_between(gptq_module):
    ordered = list(gptq_module.items())
    stream = [ordered[3], ("layer.norm.weight", torch.ones(4)), *ordered[:3][::-1]]
    out = list(read_int4(stream, _gptq_config(), torch.float32))
    assert [n for n, _ in out] == ["layer.norm.weight", "layer.q_proj.weight"]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("layer.q_proj.qzeros"), "layer.q_proj has g_idx, qweight, scales but no qzeros"),
    (lambda t: t.update({"layer.q_proj.weight_packed": torch.zeros(1, dtype=torch.int32)}), None),
    (lambda t: t.update({"layer.q_proj.weight": torch.zeros(16, 64)}), "layer.q_proj.weight is stored unquantized"),
    (lambda t: t.update({"layer.q_proj.scales": torch.zeros(3, 16, dtype=torch.float16)}),
     "layer.q_proj.scales has shape (3, 16)"),
    (lambda t: t.update({"layer.q_proj.g_idx": torch.arange(64, 0, -1, dtype=torch.int32) // 32 % 2}),
     "layer.q_proj.g_idx reorders the input rows"),
    (lambda t: t.update({"layer.q_proj.qzeros": torch.full((2, 2), -1, dtype=torch.int32)}),
     "layer.q_proj.qzeros holds a zero point of 16"),
])
def test_pairing_errors_name_the_tensor(gptq_module, edit, message):
    tensors = dict(gptq_module)
    edit(tensors)
    if message is None:  # a piece of another format passes through as a plain tensor, then the loader refuses it
        names = [n for n, _ in read_int4(_stream(tensors), _gptq_config(), torch.float32)]
        assert "layer.q_proj.weight_packed" in names
        return
    with pytest.raises(WeightsError, match=re.escape(message)):
        list(read_int4(_stream(tensors), _gptq_config(), torch.float32))


def test_extra_piece_is_named():
    d = draw_int4(16, 64, 32, True, False, torch.Generator().manual_seed(5))
    tensors = {f"layer.q_proj.{k}": v for k, v in ct_tensors(d, symmetric=False, act_order=False).items()}
    config = Int4Config.from_quantization_config(ct_config(32, symmetric=True, act_order=False), "test")
    with pytest.raises(WeightsError, match=r"layer\.q_proj\.weight_zero_point: .*has no 'weight_zero_point'"):
        list(read_int4(_stream(tensors), config, torch.float32))


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "quantization_config.bits=8"),
    ({"quant_method": "awq", "w_bit": 3, "q_group_size": 128}, "quantization_config.w_bit=3"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "quantization_config.version='gemv'"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"},
     "quantization_config.checkpoint_format='marlin'"),
    (dict(ct_config(128, True, False), format="float-quantized"), "quantization_config.format='float-quantized'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}},
     "quantization_config.config_groups.g.weights.num_bits=8"),
])
def test_unsupported_settings_are_refused_by_key_and_value(llama, tmp_path, config, message):
    src = llama.root / "awq-g64"
    if not src.exists():
        write_int4(src, llama.config, llama.state, "awq-g64", torch.Generator().manual_seed(1))
    directory = tmp_path / "bad"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(dict(llama.config, quantization_config=config)))
    (directory / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(WeightsError, match=re.escape(message)):
        resolve_model(directory)
