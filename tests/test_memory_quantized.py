"""The memory plan counts the projections the loader keeps quantized at the size they are held: the GGUF weights
``memory.kept_gguf_weights`` names are exactly those ``model_loader`` converts (the same path choice), and the
int4 bytes ``memory.kept_int4_weights`` derives from the quantization config equal what the loaded modules hold
(a GPTQ checkpoint with zero points and act order, written by the tests' independent packer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from dockyard import LLM, model_loader
from dockyard.memory import kept_gguf_weights, kept_int4_weights, projection_weight_names
from dockyard.model_source import resolve_model
from dockyard.ops import quant_linear as ql
from dockyard.registry import build_model
from dockyard.run_plan import RunTarget, plan_for_run
from tests.helpers import save_tiny_hf_model, unit_scale_llama
from tests.weights.int4_packers import write_int4
from tests.weights.test_gguf_families import _hf_model, _write


def test_plan_counts_the_blocks_the_loader_keeps(tmp_path: Path, monkeypatch) -> None:
    model, arch, qtype = _hf_model("qwen3")
    _write(model, arch, qtype, tmp_path / "m.gguf")
    source = resolve_model(tmp_path / "m.gguf")
    monkeypatch.setenv(ql.QUANT_NATIVE_ENV, "1")  # keeps every kernel format, on a CPU too
    cpu = torch.device("cpu")
    kept = kept_gguf_weights(source, cpu)
    with torch.device("meta"):
        built = build_model(source.spec)
    params = dict(built.named_parameters())
    assert projection_weight_names(source.spec) == {f"{n}.weight": tuple(params[f"{n}.weight"].shape)
                                                    for n in built.fp8_linear_names()}
    assert kept and kept == model_loader._keep_quantized(built, source, cpu, 1)
    plan, _ = plan_for_run(source, RunTarget("cpu", True), dtype="bfloat16")
    stored = sum(source.gguf.block_sizes(kept)[n][2] for n in kept)
    assert plan.weight_bytes_by_dtype[f"GGUF {qtype.name}"] == stored
    monkeypatch.setenv(ql.QUANT_NATIVE_ENV, "0")
    assert kept_gguf_weights(source, cpu) == frozenset()
    dense, _ = plan_for_run(source, RunTarget("cpu", True), dtype="bfloat16")
    assert not any(k.startswith("GGUF") for k in dense.weight_bytes_by_dtype)
    saved = sum(elements * 2 - size for _, elements, size in source.gguf.block_sizes(kept).values())
    assert dense.weight_bytes - plan.weight_bytes == saved > 0
    monkeypatch.delenv(ql.QUANT_NATIVE_ENV)  # the default: a GPU described by its size keeps the table's formats
    gpu_plan, _ = plan_for_run(source, RunTarget("cuda", False), dtype="bfloat16")
    assert (f"GGUF {qtype.name}" in gpu_plan.weight_bytes_by_dtype) == (qtype.name in ql.CUDA_DEFAULT_FORMATS)


def test_plan_counts_the_int4_weights_the_loader_keeps(tmp_path: Path, monkeypatch) -> None:
    src = save_tiny_hf_model(unit_scale_llama(intermediate_size=384), tmp_path / "fp32")
    state, config = load_file(str(src / "model.safetensors")), json.loads((src / "config.json").read_text())
    write_int4(tmp_path / "gptq", config, state, "gptq-asym-desc_act-g64", torch.Generator().manual_seed(1))
    source = resolve_model(tmp_path / "gptq")
    monkeypatch.setenv(ql.QUANT_NATIVE_ENV, "1")  # keeps int4, on a CPU too (the reference math)
    kept = kept_int4_weights(source, torch.device("cpu"))
    llm = LLM(str(tmp_path / "gptq"), device="cpu", dtype="float32", num_kv_blocks=8, max_num_seqs=1)
    modules = {f"{n}.weight": m for n, m in llm.model.named_modules() if isinstance(m, ql.Int4Linear)}
    assert set(kept) == set(modules) and len(kept) == 14
    assert all(kept[n] == (m.in_features * m.out_features, m.nbytes()) for n, m in modules.items())
    plan, _ = plan_for_run(source, RunTarget("cpu", True), dtype="float32")
    assert plan.weight_bytes_by_dtype["int4+scales"] == sum(m.nbytes() for m in modules.values())
    assert "14 projection weights kept as int4" in plan.weight_format
    monkeypatch.setenv(ql.QUANT_NATIVE_ENV, "0")
    assert kept_int4_weights(source, torch.device("cpu")) == {}
