"""The second real model, Gemma-3-270M Q4_K_M (sliding-window layers, (1 + w) norms, qk-norm, k-quants, a
262k-token SentencePiece vocabulary): dockyard's greedy tokens equal transformers' on the same GGUF
(``gguf_file=``, float32, CPU; saved once by ``tests.helpers.hf_gguf_reference``), and the config it reads agrees
with transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dockyard import LLM, SamplingParams
from tests.helpers import hf_gguf_reference

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def gemma_llm(gemma3_gguf: Path) -> LLM:
    return LLM(str(gemma3_gguf), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def gemma_hf(gemma3_gguf: Path) -> torch.nn.Module:
    return hf_gguf_reference(gemma3_gguf)


def test_config_matches_transformers(gemma_llm: LLM, gemma_hf: torch.nn.Module) -> None:
    spec, hf = gemma_llm.source.spec, gemma_hf.config
    assert spec.architecture == type(gemma_hf).__name__ == "Gemma3ForCausalLM"
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "sliding_window"):
        assert getattr(spec, field) == getattr(hf, field), field
    assert list(spec.layer_types) == list(hf.layer_types)
    assert spec.tie_word_embeddings and hf.tie_word_embeddings


def test_greedy_tokens_equal_transformers(gemma_llm: LLM, gemma_hf: torch.nn.Module) -> None:
    outputs = gemma_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = gemma_hf.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        assert list(out.outputs[0].token_ids) == ref[0, ids.shape[1]:].tolist(), prompt
