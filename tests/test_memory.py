"""Memory plan: planned weight bytes equal the bytes of the parameters actually loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dockyard import LLM
from dockyard.memory import plan_memory
from dockyard.spec import ModelSpec

CONFIGS = Path(__file__).resolve().parents[1].parent / "shared" / "configs"


def _tiny_config(tmp_path: Path, **overrides) -> Path:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
           "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "attention_bias": True, **overrides}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_planned_weight_bytes_equal_loaded(tmp_path, dtype, tied):
    path = _tiny_config(tmp_path, tie_word_embeddings=tied)
    llm = LLM(str(path), dtype=dtype, device="cpu", num_kv_blocks=8)
    loaded = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    plan = plan_memory(llm.spec, dtype)
    assert plan.weight_bytes == loaded == llm.load_report.bytes_loaded
    # independent count from the config's numbers
    h, i, v, L = 64, 160, 512, 3
    q, kv = 4 * 16, 2 * 16
    per_layer = h * (q + 2 * kv) + (q + 2 * kv) + q * h + q + 3 * h * i + 2 * h
    expected = v * h * (1 if tied else 2) + L * per_layer + h
    assert plan.num_parameters == expected


def test_kv_bytes_per_token_llama31_8b():
    path = CONFIGS / "meta-llama--Llama-3.1-8B" / "config.json"
    if not path.exists():
        pytest.skip("../shared/configs is not present")
    spec = ModelSpec.from_json_file(path)
    plan = plan_memory(spec, torch.bfloat16)
    assert plan.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB per token
    # Llama-3.1-8B: 8.03e9 parameters as published
    assert 8.0e9 < plan.num_parameters < 8.1e9
    assert plan.kv_tokens_that_fit(80 * 1024**3) > 100_000
    assert plan.kv_tokens_that_fit(8 * 1024**3) == 0  # 16 GB of weights do not fit in 8 GiB


PUBLISHED = json.loads((Path(__file__).parent / "data" / "published_parameters.json").read_text())
_UNITS = {"M": 1e6, "B": 1e9, "T": 1e12}


def _published(figure: str) -> tuple[float, float]:
    """'8.03B' → (8.03e9, allowed relative error): 1%, or one unit of the last digit published, since
    publishers round or truncate to the digits they print (Qwen3-30B-A3B's 3.35B active is '3.3B')."""
    number, unit = figure[:-1], _UNITS[figure[-1]]
    decimals = len(number.split(".")[1]) if "." in number else 0
    value = float(number) * unit
    return value, max(0.01, 10**-decimals * unit / value)


@pytest.mark.parametrize("name", sorted(k for k in PUBLISHED if not k.startswith("_")))
def test_memory_plan_matches_published_parameter_count(name):
    from tests.shared_configs import CONFIGS_DIR

    path = CONFIGS_DIR / name / "config.json"
    if not path.exists():
        pytest.skip(f"{path} is not present")
    spec = ModelSpec.from_json_file(path)
    plan = plan_memory(spec, torch.bfloat16)
    published = PUBLISHED[name]
    active = plan.active_parameters
    if published.get("active_excludes_input_embedding"):
        active -= spec.vocab_size * spec.hidden_size
    for key, ours in (("total", plan.num_parameters), ("active", active)):
        if key not in published:
            continue
        value, rtol = _published(published[key])
        assert abs(ours - value) <= rtol * value, f"{name} {key}: ours {ours:,} vs published {published[key]}"
