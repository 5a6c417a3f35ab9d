"""Llama-family equivalence against HF transformers on shrunken random configs.

Each case keeps the architectural flags of a real model (GQA, rope variant, sliding window,
tied embeddings, biases) at hidden 64 and 3 layers. The HF model's weights are saved as
safetensors and loaded through dockyard's own loader, so the name mapping is tested too.
Levels: prefill logits, then decode steps through the paged KV cache vs full recompute.
"""

from __future__ import annotations

import pytest
import torch

from dockyard import LLM
from tests.helpers import paged_logits, rel_rmse

transformers = pytest.importorskip("transformers")

ROPE_CASES = {
    "default": {},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}
SEQ_LEN = 40


def _hf_model(arch: str, rope: dict, **overrides) -> torch.nn.Module:
    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[arch]
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM}[arch]
    kwargs = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    kwargs["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default", **rope}
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kwargs)).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; perturb so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _check(tmp_path, hf_model, seq_len: int = SEQ_LEN, decode_steps: int = 4, tol: float = 1e-5) -> None:
    hf_model.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=64)
    assert llm.source.kind == "safetensors"
    ours = llm.model
    ids = torch.randint(0, hf_model.config.vocab_size, (seq_len,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(ids[None]).logits[0]
        # full-model prefill without a cache
        prefill = ours.compute_logits(ours(ids, torch.arange(seq_len)))
    assert rel_rmse(prefill, ref) < tol, "prefill logits differ from HF"
    # decode with the paged KV cache (and one chunked prefill) vs HF's full recompute
    head = seq_len - decode_steps
    chunks = [head // 2, head - head // 2] + [1] * decode_steps
    paged = paged_logits(ours, ids.tolist(), chunks)
    assert rel_rmse(paged, ref) < tol, "paged / decode-step logits differ from HF full recompute"
    assert rel_rmse(paged[-decode_steps:], ref[-decode_steps:]) < tol


@pytest.mark.parametrize("rope_name", list(ROPE_CASES))
def test_llama_matches_hf_for_each_rope_type(tmp_path, rope_name):
    _check(tmp_path, _hf_model("llama", ROPE_CASES[rope_name]))


def test_dynamic_rope_past_original_length_prefill(tmp_path):
    # Dynamic NTK changes the base once the sequence exceeds max_position_embeddings; HF then rescales
    # per forward call, so only prefill (not decode-vs-recompute) has a reference to compare with.
    hf = _hf_model("llama", ROPE_CASES["dynamic"], max_position_embeddings=32)
    hf.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=64)
    ids = torch.randint(0, 1000, (48,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        ours = llm.model.compute_logits(llm.model(ids, torch.arange(48)))
    assert rel_rmse(ours, ref) < 1e-5


def test_llama_tied_embeddings_and_biases(tmp_path):
    _check(tmp_path, _hf_model("llama", ROPE_CASES["llama3"], tie_word_embeddings=True, attention_bias=True,
                               mlp_bias=True))


def test_llama_multi_query_attention(tmp_path):
    _check(tmp_path, _hf_model("llama", {}, num_key_value_heads=1))


@pytest.mark.parametrize("window", [None, 8])
def test_mistral_matches_hf(tmp_path, window):
    _check(tmp_path, _hf_model("mistral", {}, sliding_window=window), seq_len=30)


def test_bfloat16_close_to_float32_reference(tmp_path):
    hf = _hf_model("llama", ROPE_CASES["llama3"])
    hf.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="bfloat16", device="cpu", num_kv_blocks=64)
    ids = torch.randint(0, 1000, (SEQ_LEN,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    paged = paged_logits(llm.model, ids.tolist(), [SEQ_LEN - 2, 1, 1])
    assert rel_rmse(paged, ref) < 0.05
