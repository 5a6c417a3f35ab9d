"""FP8 KV-cache scales stored in a checkpoint (the names vLLM reads) reach the attention layers; an FP8 cache
then uses them instead of calibrating, and a cache in the model's dtype ignores them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from dockyard import LLM, SamplingParams
from dockyard.errors import WeightsError
from dockyard.onboard.equivalence import build_reference
from tests.onboard.test_units import TINY

ENGINE = dict(dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 22, max_num_seqs=2)


def _checkpoint(folder, scales: dict[str, torch.Tensor]):
    build_reference({**TINY, "model_type": "llama"}).save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, **scales}, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


def test_checkpoint_scales_are_used_by_an_fp8_cache(tmp_path):
    # Layer 0 as llm-compressor writes them, layer 1 as k_proj/v_proj output scales (vLLM's other spelling).
    scales = {"model.layers.0.self_attn.k_scale": torch.tensor(0.05), "model.layers.0.self_attn.v_scale":
              torch.tensor([0.02]), "model.layers.1.self_attn.k_proj.output_scale": torch.tensor(0.25),
              "model.layers.1.self_attn.v_proj.output_scale": torch.tensor(0.125)}
    model = _checkpoint(tmp_path, scales)
    llm = LLM(model, kv_cache_dtype="fp8", **ENGINE)
    layers = llm.engine.runner.attention_layers
    assert [(m.kv_scale_source, float(m.k_scale), float(m.v_scale)) for m in layers] == [
        ("checkpoint", pytest.approx(0.05), pytest.approx(0.02)), ("checkpoint", 0.25, 0.125)]
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    plain = LLM(model, **ENGINE)  # the scales load, and a cache in the model's dtype leaves them unused
    assert plain.engine.runner.kv_cache.dtype == torch.float32


@pytest.mark.parametrize(("scales", "words"), [
    ({"model.layers.0.self_attn.k_scale": torch.tensor(0.05)}, "has a KV-cache scale for K only"),
    ({"model.layers.0.self_attn.k_scale": torch.ones(2), "model.layers.0.self_attn.v_scale": torch.tensor(1.0)},
     "must hold one value"),
    ({"model.layers.0.self_attn.kv_scale": torch.tensor(-1.0)}, "must be positive and finite"),
])
def test_bad_checkpoint_scales_are_named(tmp_path, scales, words):
    with pytest.raises(WeightsError, match=words):
        LLM(_checkpoint(tmp_path, scales), **ENGINE)
