"""The GPU branch of the start-up memory check (``dockyard.engine.memory_check``), on a real GPU.

A model too large for the device is refused with the plan's numbers before a byte is allocated on
it; one that fits loads, holds the weight bytes a hand count of its config gives, and generates.
Skipped without CUDA (CI has none); run on a GPU with
``python -m pytest -q -s tests/engine/test_memory_check_gpu.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dockyard import LLM, SamplingParams
from dockyard.errors import InsufficientMemoryError
from dockyard.memory import plan_memory
from dockyard.spec import ModelSpec
from tests.helpers import llama_parameters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU branch needs CUDA")

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
GiB = 1024**3
UTILIZATION = 0.9  # LLM's default gpu_memory_utilization


def _budget_gib() -> float:
    """What the check may use, from the driver's own figures: the utilization share less what is in use."""
    free, total = torch.cuda.mem_get_info()
    return (total * UTILIZATION - (total - free)) / GiB


@pytest.mark.parametrize("name", ["llama-3.1-70b", "deepseek-v3"])
def test_a_model_larger_than_the_gpu_is_refused_before_allocating(name):
    path = CONFIGS / f"{name}.json"
    config = json.loads(path.read_text())
    spec = ModelSpec.from_hf_config(config, name=name)
    if name.startswith("llama"):
        parameters = llama_parameters(config)  # by hand: 70.55 B
    else:  # DeepSeek-V3: 671 B in the main model (its model card), the MTP layer not built
        parameters = plan_memory(spec, torch.bfloat16).num_parameters
        assert 671e9 <= parameters < 672e9
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    budget = _budget_gib()
    with pytest.raises(InsufficientMemoryError) as info:
        LLM(str(path), device="cuda", gpu_memory_utilization=UTILIZATION)
    message = str(info.value)
    print(f"\n{name}: {message}")
    assert torch.cuda.max_memory_allocated() == before  # refused before anything was put on the GPU
    assert f"weights {parameters * 2 / GiB:.2f} GiB for {parameters:,} parameters" in message
    assert "at bfloat16" in message
    free_figure = float(message.split(" GiB free in cuda")[0].rsplit(", ", 1)[1])
    assert abs(free_figure - budget) < 0.5, (free_figure, budget)
    assert f"of {torch.cuda.mem_get_info()[1] / GiB:.1f} GiB" in message
    assert "--skip-memory-check" in message


def test_a_model_that_fits_loads_with_the_planned_weight_bytes_and_generates():
    path = CONFIGS / "llama-3.2-1b.json"
    config = json.loads(path.read_text())
    llm = LLM(str(path), device="cuda", load_format="dummy", max_model_len=2048, enforce_eager=True,
              gpu_memory_utilization=UTILIZATION)
    try:
        held = sum(p.numel() * p.element_size() for p in llm.model.parameters())
        assert held == llama_parameters(config) * 2  # bf16
        assert held == plan_memory(llm.spec, torch.bfloat16).weight_bytes  # as the check that passed counted it
        out = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
        print(f"\nllama-3.2-1b loaded: {held / GiB:.2f} GiB of weights, "
              f"{torch.cuda.max_memory_allocated() / GiB:.1f} GiB peak with the KV pool")
    finally:
        llm.shutdown()
