"""Continuous batching on the bundled model: every request's output is what it would be alone.

Engines of different shapes (tiny KV pool, small token budget, no prefix cache) take turns on
one loaded model, so the model is loaded once for the module.
"""

from __future__ import annotations

import asyncio

import pytest

from dockyard import LLM, SamplingParams
from dockyard.engine.async_engine import AsyncLLM
from dockyard.engine.llm_engine import EngineConfig, LLMEngine
from dockyard.errors import InvalidRequestError

TOPICS = ["the ocean", "a small robot", "prime numbers", "the history of Rome", "coffee", "mountains",
          "a lighthouse keeper", "jazz music", "volcanoes", "the moon landing", "bread baking", "chess",
          "a rainy city", "honeybees", "the printing press", "glaciers", "a violin maker", "deserts"]


@pytest.fixture(scope="module")
def llm(bundled_llm):
    return bundled_llm


def make_engine(llm: LLM, num_blocks: int = 512, **config) -> LLMEngine:
    cfg = EngineConfig(**config)
    return LLMEngine(llm.model, llm.spec, llm.tokenizer, cfg, llm.device, llm.dtype, num_blocks)


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams,
        max_steps: int = 10_000) -> list[list[int]]:
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, p, sp in zip(ids, prompts, params):
        engine.add_request(rid, p, sp)
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert not engine.has_unfinished_requests(), "engine did not finish"
    return [done[r] for r in ids]


def prompts_of_varied_length(llm: LLM, count: int) -> list[list[int]]:
    tok = llm.get_tokenizer()
    out = []
    for i, topic in enumerate(TOPICS[:count]):
        text = f"Write about {topic}. " + "Give many details. " * (i % 5) * 3
        out.append(tok.encode(llm.apply_chat_template([{"role": "user", "content": text}]),
                              add_special_tokens=False))
    return out


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def test_batch_invariance_10_prompts(llm):
    prompts = prompts_of_varied_length(llm, 10)
    assert len({len(p) for p in prompts}) >= 5
    engine = make_engine(llm, max_num_seqs=10)
    together = run(engine, prompts, GREEDY)
    assert engine.metrics.steps < 10 * 25  # they really ran together
    for prompt, got in zip(prompts, together):
        assert run(make_engine(llm), [prompt], GREEDY)[0] == got


def test_prefix_cache_reuses_blocks_and_output_is_identical(llm):
    tok = llm.get_tokenizer()
    prefix = tok.encode("You are a careful assistant. Answer briefly and precisely. " * 8)
    assert len(prefix) >= 64
    a = prefix + tok.encode(" Question: what is two plus two?")
    b = prefix + tok.encode(" Question: name a large city.")
    engine = make_engine(llm)
    run(engine, [a], GREEDY)
    before = engine.metrics.prompt_tokens_computed
    got_b = run(engine, [b], GREEDY)[0]
    computed_b = engine.metrics.prompt_tokens_computed - before
    assert computed_b < len(b) - 48, (computed_b, len(b))
    assert engine.block_manager.prefix_hits >= 48
    reference = run(make_engine(llm, enable_prefix_caching=False), [b], GREEDY)[0]
    assert got_b == reference


def test_preemption_recomputes_to_identical_output(llm):
    prompts = prompts_of_varied_length(llm, 6)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    reference = run(make_engine(llm), prompts, params)
    need = sum(len(p) + 40 for p in prompts)
    small = make_engine(llm, num_blocks=need // 16 // 3, enable_prefix_caching=False)
    assert small.block_manager.num_blocks * 16 < need
    assert run(small, prompts, params) == reference
    assert small.scheduler.num_preemptions > 0
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks


def test_sequence_longer_than_the_whole_pool_finishes_instead_of_looping(llm):
    prompt = list(range(100, 220))  # 120 tokens; with 24 new ones it needs 144 > the pool's 128 slots
    engine = make_engine(llm, num_blocks=8, enable_prefix_caching=False)
    ended = {}
    for rid, p in (("big", prompt), ("small", prompt[:20])):
        engine.add_request(rid, p, GREEDY)
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        ended.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    assert not engine.has_unfinished_requests()
    assert ended["big"].finish_reason == "length" and 0 < len(ended["big"].token_ids) < 24
    assert ended["small"].finish_reason == "length" and len(ended["small"].token_ids) == 24
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_chunked_prefill_matches_unchunked(llm):
    prompts = prompts_of_varied_length(llm, 5)[-1:]
    assert len(prompts[0]) > 64
    reference = run(make_engine(llm), prompts, GREEDY)
    chunked = make_engine(llm, max_num_batched_tokens=24)
    assert run(chunked, prompts, GREEDY) == reference
    assert chunked.metrics.steps > len(prompts[0]) // 24


def test_chunked_prefill_mixed_with_decodes(llm):
    prompts = prompts_of_varied_length(llm, 6)
    reference = run(make_engine(llm), prompts, GREEDY)
    assert run(make_engine(llm, max_num_batched_tokens=40, max_num_seqs=4), prompts, GREEDY) == reference


def test_abort_frees_blocks_immediately(llm):
    engine = make_engine(llm)
    engine.add_request("a", prompts_of_varied_length(llm, 3)[2], GREEDY)
    engine.add_request("b", prompts_of_varied_length(llm, 2)[1], GREEDY)
    engine.step()
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    engine.abort_request("a")
    engine.abort_request("b")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()
    assert engine.metrics.requests_finished["abort"] == 2


def test_impossible_requests_rejected(llm):
    engine = make_engine(llm, num_blocks=4)  # 64 tokens in the whole pool
    with pytest.raises(InvalidRequestError, match="whole KV cache holds 64"):
        engine.add_request("big", list(range(100)), GREEDY)
    with pytest.raises(InvalidRequestError, match="8192"):
        make_engine(llm).add_request("long", [1] * 8192, GREEDY)
    assert not engine.has_unfinished_requests()


def test_seeded_sampling_reproducible_under_batching(llm):
    prompts = prompts_of_varied_length(llm, 10)
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=42)
    alone = run(make_engine(llm), [prompts[3]], seeded)[0]
    mixed = [SamplingParams(max_tokens=10 + i, temperature=0.8) for i in range(10)]
    mixed[3] = seeded
    assert run(make_engine(llm, max_num_batched_tokens=64), prompts, mixed)[3] == alone


def test_async_engine_streams_and_aborts(llm):
    engine = make_engine(llm)
    prompt = prompts_of_varied_length(llm, 1)[0]

    async def main():
        aengine = AsyncLLM(engine)
        seen = []
        async for out in aengine.generate(prompt, GREEDY):
            seen.append(len(out.outputs[0].token_ids))
        # a stream closed early aborts its request and frees its blocks
        stream = aengine.generate(prompt, SamplingParams(max_tokens=200, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()
        await aengine.shutdown()
        return seen

    seen = asyncio.run(main())
    assert seen == list(range(1, 25))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.metrics.requests_finished["abort"] == 1
