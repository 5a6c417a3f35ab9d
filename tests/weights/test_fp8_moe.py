"""FP8 block-quantized MoE checkpoints (DeepSeek-V3/R1's layout: one 2-D e4m3 weight and block scale per
projection, every expert's included) load with the experts dequantized, and say so.

A tiny Qwen3-MoE is written twice: in bfloat16, and with every layer projection block-quantized
(``weights.fp8_quantize``, independent of the tiled dequantization). Loaded on the CPU, each expert weight
must equal its float64 dequantization rounded to float32, and the logits must stay within FP8's error of the
bfloat16 checkpoint's. With the FP8 projections kept native (``DOCKYARD_FP8_NATIVE=1``, allowed on a CPU for
tests) the attention projections are FP8 modules while the experts are dequantized on load, which is logged
with the reason.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from dockyard.engine.llm import LLM
from dockyard.ops.fp8_linear import Fp8Linear
from dockyard.weights.fp8 import FP8_NATIVE_ENV
from dockyard.weights.fp8_quantize import FP8_LOGITS_BOUND, fp8_quantization_config, quantize_fp8_blocks
from tests.helpers import rel_rmse, unit_scale_state
from tests.weights.test_fp8 import BLOCK, _logits, _reference

CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 256,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
          "vocab_size": 512, "max_position_embeddings": 256, "tie_word_embeddings": False, "bos_token_id": 1,
          "eos_token_id": 2, "intermediate_size": 512, "moe_intermediate_size": 192, "num_experts": 4,
          "num_experts_per_tok": 2, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1e6}
EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def _write(directory: Path, tensors: dict[str, torch.Tensor], quant: dict | None) -> Path:
    directory.mkdir()
    config = dict(CONFIG, quantization_config=quant) if quant is not None else CONFIG
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The bf16 checkpoint (random weights at unit signal scale) and its block-FP8 twin (192-wide experts: a
    ragged 64-wide last block)."""
    root = tmp_path_factory.mktemp("fp8moe")
    state = {name: w.to(torch.bfloat16) for name, w in unit_scale_state(CONFIG, root / "shapes").items()}
    quantized, fp8 = {}, dict(state)
    for name, w in state.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight") and w.dim() == 2:
            q, s = quantize_fp8_blocks(w, (BLOCK, BLOCK))
            fp8[name], fp8[name + "_scale_inv"] = q, s
            quantized[name] = (q, s)
    assert sum(bool(EXPERT.search(n)) for n in quantized) == 2 * 4 * 3
    return SimpleNamespace(state=state, quantized=quantized, bf16=_write(root / "bf16", state, None),
                           fp8=_write(root / "fp8", fp8, fp8_quantization_config((BLOCK, BLOCK))))


def _llm(path: Path) -> LLM:
    return LLM(path, dtype="float32", device="cpu", num_kv_blocks=16, max_num_seqs=2)


def test_fp8_experts_dequantized_on_load(checkpoints, monkeypatch, caplog):
    monkeypatch.setenv(FP8_NATIVE_ENV, "0")
    ref = _llm(checkpoints.bf16)
    with caplog.at_level(logging.INFO, logger="dockyard"):
        fp8 = _llm(checkpoints.fp8)
    assert any("dequantized on load" in r.getMessage() for r in caplog.records)
    assert fp8.load_report.missing == fp8.load_report.unexpected == []
    params = dict(fp8.model.named_parameters())
    for name, (q, s) in checkpoints.quantized.items():
        assert torch.equal(params[name].detach(), _reference(q, s).float()), name
    ratio = rel_rmse(_logits(fp8), _logits(ref))
    assert 0 < ratio < FP8_LOGITS_BOUND


def test_native_fp8_projections_leave_experts_dequantized_and_say_so(checkpoints, monkeypatch, caplog):
    monkeypatch.setenv(FP8_NATIVE_ENV, "1")
    with caplog.at_level(logging.INFO, logger="dockyard"):
        fp8 = _llm(checkpoints.fp8)
    attention = fp8.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(attention, Fp8Linear)
    params = dict(fp8.model.named_parameters())
    experts = [n for n in checkpoints.quantized if EXPERT.search(n)]
    for name in experts:
        q, s = checkpoints.quantized[name]
        assert params[name].dtype == torch.float32 and torch.equal(params[name].detach(), _reference(q, s).float())
    messages = [r.getMessage() for r in caplog.records if "outside the FP8 projections" in r.getMessage()]
    assert len(messages) == 1 and f"{len(experts)} FP8 weights" in messages[0]
    # (No logits bound here: the activations' e4m3 rounding can flip a router's choice in a model this small.)
    assert torch.isfinite(_logits(fp8)).all()
