"""Weight loading: safetensors (single and sharded), dummy weights, strict accounting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dockyard.errors import WeightsError
from dockyard.model_source import resolve_model
from dockyard.registry import build_model
from dockyard.spec import ModelSpec
from dockyard.weights.dummy import iter_dummy
from dockyard.weights.loader import load_weights
from dockyard.weights.safetensors_dir import iter_safetensors

CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 32,
       "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
       "max_position_embeddings": 64}


def _model():
    return build_model(ModelSpec.from_hf_config(CFG))


def _reference_state(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in _model().state_dict().items()}


def test_sharded_safetensors_roundtrip(tmp_path):
    state = _reference_state()
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / fname))
        weight_map.update({k: fname for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = _model()
    report = load_weights(model, iter_safetensors(tmp_path))
    assert report.loaded == len(state) and not report.missing and not report.unexpected
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_missing_and_unexpected_are_named():
    state = _reference_state()
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.1.mlp.upp_proj.weight"] = torch.zeros(64, 32)
    with pytest.raises(WeightsError) as info:
        load_weights(_model(), state.items())
    msg = str(info.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.layers.1.mlp.upp_proj.weight" in msg


def test_shape_mismatch_is_named_once():
    state = _reference_state()
    state["model.norm.weight"] = torch.ones(31)
    with pytest.raises(WeightsError, match=r"model.norm.weight: checkpoint \(31,\) vs model \(32,\)") as info:
        load_weights(_model(), state.items())
    assert str(info.value).count("model.norm.weight") == 1 and "missing" not in str(info.value)


def test_integer_tensor_where_weights_are_floating_is_named(tmp_path):
    state = _reference_state()
    state["model.layers.0.self_attn.k_proj.weight"] = torch.randint(-8, 8, (16, 32), dtype=torch.int8)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"integers .*model.layers.0.self_attn.k_proj.weight \(int8\)") as info:
        load_weights(_model(), iter_safetensors(tmp_path))
    assert "missing" not in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_named_unless_switched_off(tmp_path, bad, monkeypatch):
    state = _reference_state()
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = bad
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"NaN or infinite values \(1\): model.layers.1.mlp.down_proj.weight;"):
        load_weights(_model(), iter_safetensors(tmp_path))
    model = _model()
    load_weights(model, iter_safetensors(tmp_path), check_finite=False)
    loaded = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(loaded.nan_to_num(), state["model.layers.1.mlp.down_proj.weight"].nan_to_num())
    monkeypatch.setenv("DOCKYARD_CHECK_FINITE", "0")
    load_weights(_model(), iter_safetensors(tmp_path))


def test_dummy_weights_deterministic_and_finite():
    a, b = _model(), _model()
    load_weights(a, iter_dummy(a, seed=3))
    load_weights(b, iter_dummy(b, seed=3))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    c = _model()
    load_weights(c, iter_dummy(c, seed=4))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    ids = torch.arange(20) % 128
    logits = a.compute_logits(a(ids, torch.arange(20)))
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_directory_with_config_only_uses_dummy(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    assert resolve_model(tmp_path).kind == "dummy"
    assert resolve_model(tmp_path / "config.json").kind == "dummy"


def test_quantized_checkpoint_is_refused_naming_the_method(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"lm_head.weight": torch.zeros(64, 32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="quant_method='bitsandbytes'"):
        resolve_model(str(tmp_path))
    assert resolve_model(str(tmp_path), "dummy").kind == "dummy"  # the architecture still runs on dummy weights
    # fp8 and the int4 methods are those dockyard loads (tests/weights/test_fp8.py, tests/weights/test_int4.py).
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert resolve_model(str(tmp_path)).fp8 is not None
