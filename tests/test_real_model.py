"""The bundled real model (SmolLM2-135M-Instruct, Q4_1 GGUF) against HF transformers in fp32.

Both sides load the same GGUF file: transformers dequantizes it with its own loader, dockyard
with its own; greedy generations must agree token for token and logits to rmse ratio < 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from dockyard import SamplingParams
from tests.helpers import paged_logits, rel_rmse

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

PLAIN_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "The three largest cities in Europe are",
]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
]


@pytest.fixture(scope="module")
def llm(bundled_llm):
    return bundled_llm


def _hf_greedy(hf_model, ids: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=max_new, do_sample=False)
    return out[0, len(ids):].tolist()


def test_greedy_matches_hf_token_for_token(llm, hf_model):
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PLAIN_PROMPTS]
    prompts += [tok.encode(llm.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
                for p in CHAT_PROMPTS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0.0), use_tqdm=False)
    for ids, out in zip(prompts, outs):
        ref = _hf_greedy(hf_model, ids, 64)
        assert out.outputs[0].token_ids == ref, tok.decode(ids)
    assert sum(len(o.outputs[0].token_ids) for o in outs) >= 5 * 32  # real generations, not instant EOS


def test_prefill_and_decode_logits_match_hf(llm, hf_model):
    tok = llm.get_tokenizer()
    text = " ".join(["The history of the printing press begins in the fifteenth century."] * 30)
    ids = tok.encode(text)[:300]
    assert len(ids) >= 256
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    model = llm.model
    with torch.no_grad():
        ours = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))
    assert rel_rmse(ours, ref) < 1e-4
    # Build the cache on the first 296 tokens, then 4 decode steps: each must match full recompute.
    paged = paged_logits(model, ids, [296, 1, 1, 1, 1], block_size=16, num_blocks=32)
    assert rel_rmse(paged[-4:], ref[-4:]) < 1e-4
    assert rel_rmse(paged[-4:], ours[-4:]) < 1e-5


def test_chat_template_from_gguf(llm):
    prompt = llm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user" in prompt and prompt.rstrip().endswith("<|im_start|>assistant")
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=32, temperature=0.0), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
