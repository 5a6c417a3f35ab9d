"""The fit and features gates name a checkpoint's quantization and what dockyard does with it (native,
dequantized, refused, none), for GGUF files and ``quantization_config`` methods; the memory plan counts
GGUF weights kept as blocks at their stored size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dockyard.memory import plan_memory, storage_of
from dockyard.model_source import resolve_model
from dockyard.onboard import OnboardOptions, gate_prose
from dockyard.onboard.config_features import quantization_scheme
from dockyard.onboard.context import GateContext
from dockyard.onboard.gates import features as features_gate
from dockyard.onboard.gates import fit as fit_gate
from dockyard.onboard.gates import inspect as inspect_gate
from dockyard.onboard.machine import detect_machine
from dockyard.weights.gguf import native_parameter_names
from tests.onboard.test_units import TINY
from tests.weights.test_gguf_families import _hf_model, _write

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
BNB = {"quant_method": "bitsandbytes", "load_in_4bit": True}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": False, "desc_act": True}
CT = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                                       "symmetric": True}}}}
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def test_schemes_name_what_the_config_says() -> None:
    assert quantization_scheme(AWQ) == "AWQ int4, group size 128, zero points (gemm packing)"
    assert quantization_scheme(GPTQ) == "GPTQ int4, group size 64, zero points, desc_act (act-order permutation)"
    assert quantization_scheme(CT) == "compressed-tensors pack-quantized: int4 group 32, symmetric"
    assert quantization_scheme(FP8) == "FP8 e4m3 weights, scales per 128x128 block, dynamic activation scales"
    assert quantization_scheme({"quant_method": "mxfp4"}).startswith("MXFP4")


def _context(tmp_path: Path, model: Path) -> GateContext:
    ctx = GateContext(options=OnboardOptions(model=str(model), device="cpu", weights="dummy"),
                      machine=detect_machine("cpu", None), out_dir=tmp_path / "out")
    assert inspect_gate.run(ctx).status == "pass"
    return ctx


def _config_dir(tmp_path: Path, quant: dict | None) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY, **({"quantization_config": quant} if quant else {})}))
    return folder


@pytest.mark.parametrize(("quant", "handling"), [(None, "none"), (BNB, "refused"), (AWQ, "dequantized"),
                                                     (FP8, "dequantized")])
def test_config_checkpoints(tmp_path: Path, quant: dict | None, handling: str) -> None:
    ctx = _context(tmp_path, _config_dir(tmp_path, quant))
    verdict = fit_gate.quantization_of(ctx)
    assert verdict["handling"] == handling, verdict
    assert verdict["scheme"] == ("none" if quant is None else quantization_scheme(quant))
    if quant is BNB:
        assert "'bitsandbytes'" in verdict["why"] and "dummy weights" in verdict["why"]
    outcome = fit_gate.run(ctx)
    assert outcome.evidence["quantization"] == verdict
    if quant is not None:
        assert outcome.summary.startswith(f"{verdict['scheme']}, {handling}; ")
    section = "\n".join(gate_prose._fit(gate_prose._Read(outcome.evidence)))
    assert f"| quantization | {verdict['scheme']}: {handling} (" in section
    row = features_gate._quantization_row(ctx)  # the real gate did not run here
    assert row["status"] == {"none": "not-applicable", "refused": "unsupported", "dequantized": "not-run"}[handling]
    assert row["evidence"] == {"scheme": verdict["scheme"], "handling": handling}
    assert row["feature"] == ("quantization" if quant is None else f"quantization ({verdict['scheme']})")


def test_gguf_file(tmp_path: Path) -> None:
    model, arch, qtype = _hf_model("qwen3")
    path = tmp_path / "q.gguf"
    _write(model, arch, qtype, path)
    ctx = _context(tmp_path, path)
    verdict = fit_gate.quantization_of(ctx)
    assert verdict["scheme"] == "GGUF (Q4_K, F32)" and verdict["handling"] == "dequantized"
    assert "dequantized to float32 on load" in verdict["why"]


def test_plan_counts_kept_blocks_at_stored_size(tmp_path: Path) -> None:
    model, arch, qtype = _hf_model("qwen3_moe")
    _write(model, arch, qtype, tmp_path / "m.gguf")
    source = resolve_model(tmp_path / "m.gguf")
    kept = frozenset(source.gguf.kernel_quantized_weights(native_parameter_names(source.gguf)))
    dense = plan_memory(source.spec, torch.bfloat16, storage=storage_of(source))
    blocks = plan_memory(source.spec, torch.bfloat16, storage=storage_of(source, gguf_blocks=kept))
    sizes = source.gguf.block_sizes(kept)
    assert len(sizes) == len(kept) and {q for q, _, _ in sizes.values()} == {"Q4_K"}
    # Q4_K: 144 bytes per 256 weights; the experts' shares add up to their stacked tensors.
    assert all(stored * 256 == elements * 144 for _, elements, stored in sizes.values())
    saved = sum(elements * 2 - stored for _, elements, stored in sizes.values())
    assert dense.weight_bytes - blocks.weight_bytes == saved
    assert blocks.weight_bytes_by_dtype["GGUF Q4_K"] == sum(s for _, _, s in sizes.values())
    assert "GGUF weights kept as stored blocks (Q4_K" in blocks.weight_format
    assert dense.weight_format == "GGUF blocks dequantized to bfloat16 on load"
    assert blocks.checkpoint_bytes == dense.checkpoint_bytes == sum(source.gguf.stored_bytes().values())
