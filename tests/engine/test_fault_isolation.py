"""A request fails alone: bad values are refused when the request is added (the engine knows the
vocabulary), and a failure inside a step finishes only the request whose rows caused it.

The reference for "the others are unaffected" is the same request run alone (greedy)."""

from __future__ import annotations

import pytest

from dockyard import SamplingParams
from dockyard.errors import InvalidRequestError
from tests.helpers import poison

PROMPTS = ["The capital of France is", "One, two, three,", "def add(a, b):"]


# The crashes of issue 16's table: each killed the engine inside a step before.
@pytest.mark.parametrize("kwargs, param", [
    (dict(top_k=2**63), "top_k"),
    (dict(top_k=2**64, temperature=0), "top_k"),
    (dict(stop_token_ids=[49152], min_tokens=2), "stop_token_ids"),
    (dict(stop_token_ids=[10**9], min_tokens=2), "stop_token_ids"),
    (dict(stop_token_ids=[2**63], min_tokens=1), "stop_token_ids"),
])
def test_table_of_crashes_is_refused_when_added(bundled_llm, kwargs, param):
    vocab = bundled_llm.engine.spec.vocab_size
    with pytest.raises(InvalidRequestError) as info:
        bundled_llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, **kwargs), use_tqdm=False)
    assert info.value.param == param
    if max(kwargs.get("stop_token_ids", [0])) < 2**31 and kwargs.get("top_k", 0) < 2**31:
        assert str(vocab) in str(info.value)  # refused by the engine, which knows the vocabulary
    assert not bundled_llm.engine.has_unfinished_requests()
    # the engine still answers, as a fresh request alone would
    out = bundled_llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def run_engine(engine, prompts: list[list[int]], params: list[SamplingParams], poisons: dict[int, str]) -> list:
    """Add every request, poison some, and step until all finished; outputs in request order."""
    for i, (ids, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"fi-{i}", ids, p)
    for i, kind in poisons.items():
        poison(params[i], kind)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step(report_unfinished=False):
            done[out.request_id] = out
    return [done[f"fi-{i}"] for i in range(len(prompts))]


def _alone(llm, prompt: str, params: SamplingParams) -> list[int]:
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids


def test_a_request_failing_inside_a_step_fails_alone(bundled_llm):
    engine = bundled_llm.engine
    healthy = [SamplingParams(max_tokens=6, temperature=0),
               SamplingParams(max_tokens=6, temperature=0.8, seed=1234),
               SamplingParams(max_tokens=6, temperature=0, n=2)]
    alone = [_alone(bundled_llm, PROMPTS[i], p) for i, p in enumerate(healthy)]
    # "after-draw" fails once the seeded row has drawn: its retry must draw the same again.
    kinds = ["mask", "sampler", "after-draw", "stop-check"]
    tok = bundled_llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS + PROMPTS + PROMPTS[:1]]
    params = healthy + [SamplingParams(max_tokens=6, temperature=0, min_tokens=2) for _ in kinds]
    outs = run_engine(engine, prompts, params, {3 + i: k for i, k in enumerate(kinds)})
    for i, out in enumerate(outs[:3]):
        assert out.error is None and out.finished
        assert out.outputs[0].token_ids == alone[i], i
    for kind, out in zip(kinds, outs[3:]):
        assert out.finished and out.error is not None, kind
        assert {c.finish_reason for c in out.outputs} == {"error"}, kind
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_used_blocks == 0 and not engine.scheduler.running
    # and the engine goes on as before
    assert _alone(bundled_llm, PROMPTS[0], healthy[0]) == alone[0]
