"""Every supported family equals HF transformers: the onboarding equivalence gate on real configs.

Each case shrinks a real published ``config.json`` from ``shared/configs`` (every architectural flag
kept: rope type and scaling, q/kv ratio, biases, q/k norms, layer types, expert routing, MLA ranks)
and runs :func:`check_equivalence`: HF's model is built from the shrunken config, saved with
``save_pretrained`` and loaded through dockyard's loader; then every block of each layer type, each
layer type, the prefill logits and chunked prefill + decode through the paged KV cache are compared
in fp32 against HF's own computation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dockyard.onboard.equivalence import TOLERANCES, check_equivalence
from dockyard.registry import MODEL_REGISTRY
from dockyard.spec import ModelSpec
from tests.shared_configs import SHARED_CONFIGS, shared_config

pytest.importorskip("transformers")

# One or more real configs per family; together they cover every flag the family reads.
FAMILY_CASES = {
    "llama": ["meta-llama--Llama-3.1-8B", "meta-llama--Llama-3.2-1B", "HuggingFaceTB--SmolLM2-135M-Instruct"],
    "mistral": ["mistralai--Mistral-7B-v0.1"],
    "qwen2": ["Qwen--Qwen2.5-7B", "Qwen--Qwen2.5-0.5B"],
    "qwen3": ["Qwen--Qwen3-8B"],
    "gemma2": ["google--gemma-2-2b"],
    "gemma3": ["google--gemma-3-1b-it", "google--gemma-3-27b-it"],
    "olmo2": ["allenai--OLMo-2-0425-1B"],
    "phi3": ["microsoft--Phi-3-mini-4k-instruct", "microsoft--Phi-3-mini-128k-instruct",
             "microsoft--Phi-4-mini-instruct", "microsoft--phi-4"],
    "mixtral": ["mistralai--Mixtral-8x7B-v0.1"],
    "qwen2_moe": ["Qwen--Qwen1.5-MoE-A2.7B-Chat"],
    "qwen3_moe": ["Qwen--Qwen3-30B-A3B"],
    "deepseek_v2": ["deepseek-ai--DeepSeek-V2-Lite"],
    "deepseek_v3": ["deepseek-ai--DeepSeek-V3"],
    "gpt_oss": ["openai--gpt-oss-20b"],
}
# shared/configs has no Granite config: one in the shape of IBM's Granite 3.0 2B (its muP multipliers).
GRANITE = Path(__file__).parents[1] / "data" / "configs" / "granite-3.0-shaped" / "config.json"
CASES = [pytest.param(name, id=f"{family}:{name.split('--')[1]}") for family, names in FAMILY_CASES.items()
         for name in names]


def _assert_passes(config: dict) -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    result = check_equivalence(config)
    assert result.status == "pass", result.reason + "\n" + json.dumps(
        [(lv.where, lv.rel_err, lv.detail) for lv in result.levels], indent=1)
    levels = {lv.level for lv in result.levels}
    assert levels == {"block", "layer", "model", "decode"}
    assert all(lv.rel_err is not None and lv.rel_err <= TOLERANCES["float32"][lv.level if lv.level != "block"
               else "mlp"] for lv in result.levels)
    # Every kind of layer (attention type × dense/MoE MLP) of the shrunken config was compared on its own.
    spec = ModelSpec.from_hf_config({**result.shrunk_config, "architectures": config["architectures"],
                                     "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    kinds = {(spec.layer_types[i] if spec.layer_types else "", spec.is_moe_layer(i))
             for i in range(spec.num_hidden_layers)}
    compared = {lv.block for lv in result.levels if lv.level == "layer"}
    assert len(compared) == len(kinds), (compared, kinds)


@pytest.mark.parametrize("name", CASES)
def test_family_equals_hf(name: str) -> None:
    config = shared_config(name)
    assert config["architectures"][0] in MODEL_REGISTRY
    _assert_passes(config)


def test_granite_equals_hf() -> None:
    _assert_passes(json.loads(GRANITE.read_text()))


def test_every_registered_family_has_a_case() -> None:
    families = {entry.family for entry in MODEL_REGISTRY.values()}
    covered = {MODEL_REGISTRY[shared_config(n)["architectures"][0]].family
               for names in FAMILY_CASES.values() for n in names} | {"granite"}
    assert families <= covered, families - covered
    if SHARED_CONFIGS:
        assert all(n in SHARED_CONFIGS for names in FAMILY_CASES.values() for n in names)
