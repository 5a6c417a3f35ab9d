"""Generation on the bundled model: seeds, stopping rules, n, and request errors."""

from __future__ import annotations

import pytest

from dockyard import SamplingParams
from dockyard.errors import InvalidRequestError


@pytest.fixture(scope="module")
def llm(bundled_llm):
    return bundled_llm


def _gen(llm, prompt, **kw):
    return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0]


def test_same_seed_same_tokens_different_seed_different(llm):
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.95)
    a = _gen(llm, "Once upon a time", seed=7, **kw).outputs[0].token_ids
    b = _gen(llm, "Once upon a time", seed=7, **kw).outputs[0].token_ids
    c = _gen(llm, "Once upon a time", seed=8, **kw).outputs[0].token_ids
    assert a == b
    assert a != c


def test_seeded_sample_independent_of_batch_neighbours(llm):
    p = SamplingParams(max_tokens=16, temperature=0.9, seed=123)
    alone = llm.generate(["The weather today"], p, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(["Hello there", "The weather today", "1, 2, 3,"],
                         [SamplingParams(max_tokens=20, temperature=1.0), p, SamplingParams(max_tokens=5)],
                         use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone


def test_greedy_batch_equals_alone(llm):
    prompts = ["The capital of Italy is", "def add(a, b):", "My favourite colour is", "Water boils at"]
    params = SamplingParams(max_tokens=20, temperature=0.0)
    together = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, together):
        assert _gen(llm, prompt, max_tokens=20, temperature=0.0).outputs[0].token_ids == out.outputs[0].token_ids


def test_max_tokens_and_length_finish(llm):
    out = _gen(llm, "Count: 1, 2, 3,", max_tokens=5, temperature=0.0, ignore_eos=True).outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_string_truncates_text(llm):
    free = _gen(llm, "Count: 1, 2, 3,", max_tokens=12, temperature=0.0).outputs[0].text
    assert " 5," in free  # the model counts on
    out = _gen(llm, "Count: 1, 2, 3,", max_tokens=12, temperature=0.0, stop=[" 5"]).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == " 5"
    assert out.text == free[: free.index(" 5")]
    kept = _gen(llm, "Count: 1, 2, 3,", max_tokens=12, temperature=0.0, stop=[" 5"],
                include_stop_str_in_output=True).outputs[0]
    assert kept.text.endswith(" 5")


def test_stop_token_ids(llm):
    free = _gen(llm, "Count: 1, 2, 3,", max_tokens=8, temperature=0.0).outputs[0].token_ids
    out = _gen(llm, "Count: 1, 2, 3,", max_tokens=8, temperature=0.0, stop_token_ids=[free[2]]).outputs[0]
    assert out.token_ids == free[:3] and out.finish_reason == "stop" and out.stop_reason == free[2]


def test_eos_stops_unless_ignored(llm):
    msgs = [{"role": "user", "content": "Say just the word yes."}]
    out = llm.chat(msgs, SamplingParams(max_tokens=64, temperature=0.0), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.spec.eos_token_ids
    out = llm.chat(msgs, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True),
                   use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 64


def test_n_samples(llm):
    out = _gen(llm, "A random word:", n=3, max_tokens=8, temperature=1.0, seed=1)
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_logprobs(llm):
    out = _gen(llm, "The capital of France is", max_tokens=4, temperature=0.0, logprobs=3).outputs[0]
    assert len(out.logprobs) == 4
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and len(entry) >= 3
        assert entry[tok] == max(entry.values())  # greedy picks the most likely token
        assert all(v <= 0 for v in entry.values())


def test_prompt_too_long_and_empty(llm):
    with pytest.raises(InvalidRequestError, match=r"9000 tokens.*8192"):
        llm.generate([[1] * 9000], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
