"""ModelSpec: parsing real published configs and rejecting broken ones with named fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dockyard.errors import ConfigError, InvalidModelFileError, ModelNotFoundError
from dockyard.ops.activation import get_activation
from dockyard.spec import ACTIVATION_NAMES, ModelSpec

CONFIGS = Path(__file__).resolve().parents[1].parent / "shared" / "configs"
LLAMA_8B = CONFIGS / "meta-llama--Llama-3.1-8B" / "config.json"

BASE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
}


def _need_configs() -> None:
    if not CONFIGS.is_dir():
        pytest.skip("../shared/configs is not present")


def test_llama31_8b_fields():
    _need_configs()
    spec = ModelSpec.from_json_file(LLAMA_8B)
    raw = json.loads(LLAMA_8B.read_text())
    assert spec.num_hidden_layers == raw["num_hidden_layers"]
    assert spec.num_key_value_heads == raw["num_key_value_heads"]
    assert spec.head_dim == raw["hidden_size"] // raw["num_attention_heads"]
    assert spec.rope.rope_type == "llama3"
    assert spec.rope.factor == raw["rope_scaling"]["factor"]
    assert spec.rope.original_max_position_embeddings == raw["rope_scaling"]["original_max_position_embeddings"]
    assert spec.rope.theta == raw["rope_theta"]
    assert spec.eos_token_ids == (raw["eos_token_id"],)
    assert spec.torch_dtype == "bfloat16"


def test_every_llama_family_config_parses():
    _need_configs()
    for path in sorted(CONFIGS.glob("*/config.json")):
        raw = json.loads(path.read_text())
        if raw["architectures"][0] in ("LlamaForCausalLM", "MistralForCausalLM"):
            spec = ModelSpec.from_json_file(path)
            assert spec.hidden_size == raw["hidden_size"], path
            assert spec.sliding_window == raw.get("sliding_window"), path


def test_transformers_v5_rope_parameters():
    cfg = dict(BASE)
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                              "original_max_position_embeddings": 64}
    spec = ModelSpec.from_hf_config(cfg)
    assert (spec.rope.rope_type, spec.rope.theta, spec.rope.factor) == ("yarn", 1e6, 4.0)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"num_key_value_heads": 3}, "num_attention_heads=4 is not divisible by num_key_value_heads=3"),
        ({"hidden_size": 0}, "hidden_size=0"),
        ({"num_hidden_layers": -1}, "num_hidden_layers=-1"),
        ({"intermediate_size": 0}, "intermediate_size=0"),
        ({"rope_scaling": {"rope_type": "wobbly", "factor": 2.0}}, "rope_type='wobbly'"),
        ({"max_position_embeddings": 20_000_000}, "max_position_embeddings=20000000"),
        ({"hidden_size": 66}, "hidden_size=66 is not divisible by num_attention_heads=4"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"hidden_act": "swish9"}, "hidden_act='swish9'"),
        ({"vocab_size": "many"}, "vocab_size='many'"),
        ({"eos_token_id": 5000}, "eos_token_id=5000"),
    ],
)
def test_invalid_configs_name_field_and_value(change, needle):
    with pytest.raises(ConfigError, match=None) as info:
        ModelSpec.from_hf_config({**BASE, **change})
    assert needle in str(info.value)


def test_missing_field_is_named():
    cfg = dict(BASE)
    del cfg["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        ModelSpec.from_hf_config(cfg)


def test_config_file_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nope.json"):
        ModelSpec.from_json_file(tmp_path / "nope.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidModelFileError, match="config.json"):
        ModelSpec.from_json_file(bad)


def test_every_activation_name_the_spec_accepts_is_implemented():
    # spec.py lists the names itself so that reading a config needs no torch; the ops must have each one.
    for name in ACTIVATION_NAMES:
        assert callable(get_activation(name))
    with pytest.raises(ConfigError, match="hidden_act='swish'"):
        get_activation("swish")
