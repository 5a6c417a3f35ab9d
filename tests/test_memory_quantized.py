"""The memory plan of a GGUF run counts the projections the loader keeps as blocks at their stored size: the
weights ``memory.kept_gguf_weights`` names are exactly those ``model_loader`` converts (the same path choice), and
``run_plan.plan_for_run`` and the start-up check use them."""

from __future__ import annotations

from pathlib import Path

import torch

from dockyard import model_loader
from dockyard.memory import kept_gguf_weights, projection_weight_names
from dockyard.model_source import resolve_model
from dockyard.ops import quant_linear as ql
from dockyard.registry import build_model
from dockyard.run_plan import RunTarget, plan_for_run
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
    assert projection_weight_names(source.spec) == {f"{n}.weight" for n in built.fp8_linear_names()}
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
