"""Prompt logprobs (``SamplingParams.prompt_logprobs``) on the bundled model against HF transformers.

The reference is HF's own forward pass over the same token ids (the same GGUF, loaded by
transformers' loader, fp32), log-softmaxed in float64. Chunked prefill, prefix caching and
preemption must not change the values: every prompt row is computed, never taken from the cache.
"""

from __future__ import annotations

import pytest
import torch

from dockyard import LLM, SamplingParams
from dockyard.engine import model_runner
from dockyard.engine.llm_engine import LLMEngine
from dockyard.engine.outputs import RequestOutput
from dockyard.errors import InvalidRequestError
from tests.engine.test_engine import make_engine

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

TOL_HF = 1e-4  # dockyard fp32 vs HF fp32 logits, log-softmaxed in float64
TOL_SELF = 5e-5  # dockyard vs dockyard with another batch shape / chunking (fp32 sums in another order)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The three largest cities in Europe are Istanbul, Moscow and London. Paris comes next.",
]
LONG_TEXT = " ".join(["The history of the printing press begins in the fifteenth century, in Mainz."] * 14)


@pytest.fixture(scope="module")
def llm(bundled_llm: LLM) -> LLM:
    return bundled_llm


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab] float64: row i is the distribution of token i + 1 given ids[:i + 1]."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0]
    return logits.double().log_softmax(dim=-1)[:-1]


def encode(llm: LLM, text: str) -> list[int]:
    return llm.get_tokenizer().encode(text)


def run_engine(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams,
               max_steps: int = 10_000) -> list[RequestOutput]:
    """Every request's final RequestOutput, in prompt order."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    base = engine.metrics.requests_added
    ids = [f"p{base + i}" for i in range(len(prompts))]
    for rid, p, sp in zip(ids, prompts, params):
        engine.add_request(rid, p, sp)
    done: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert not engine.has_unfinished_requests(), "engine did not finish"
    return [done[r] for r in ids]


def check_against_hf(entries: list[dict[int, float] | None], ids: list[int], ref: torch.Tensor, k: int) -> None:
    """Entry format and values: the prompt token first, then HF's top-k by descending logprob."""
    assert len(entries) == len(ids)
    assert entries[0] is None
    for i in range(1, len(ids)):
        entry, row, tok = entries[i], ref[i - 1], ids[i]
        keys = list(entry)
        assert keys[0] == tok, (i, keys)
        assert abs(entry[tok] - row[tok].item()) < TOL_HF, (i, entry[tok], row[tok].item())
        top = [t for t in row.topk(k).indices.tolist()] if k else []
        mine = sorted(entry.items(), key=lambda kv: -kv[1])[:k]  # the k most likely in the entry
        assert len(entry) == len(set(top) | {tok}), (i, entry, top)
        for (t, lp), ref_t in zip(mine, top):
            # Same token at each rank, unless two tokens are tied within the tolerance.
            assert t == ref_t or abs(row[t].item() - row[ref_t].item()) < TOL_HF, (i, mine, top)
            assert abs(lp - row[t].item()) < TOL_HF, (i, t, lp, row[t].item())
        rest = [lp for t, lp in entry.items()][1:]
        assert rest == sorted(rest, reverse=True)  # the top-k follow in descending order


def assert_same(a: list[dict[int, float] | None], b: list[dict[int, float] | None], tol: float = TOL_SELF) -> None:
    assert len(a) == len(b)
    assert a[0] is None and b[0] is None
    for i, (x, y) in enumerate(zip(a[1:], b[1:]), start=1):
        assert list(x)[0] == list(y)[0], i
        assert set(x) == set(y) or len(x) == len(y), (i, x, y)  # ties at the k-th place may swap
        for t in set(x) & set(y):
            assert abs(x[t] - y[t]) < tol, (i, t, x[t], y[t])


# ---------------------------------------------------------------- against HF
def test_prompt_logprobs_k0_match_hf(llm, hf_model):
    prompts = [encode(llm, t) for t in TEXTS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)
    for ids, out in zip(prompts, outs):
        assert out.prompt_token_ids == ids
        check_against_hf(out.prompt_logprobs, ids, hf_logprobs(hf_model, ids), k=0)
        assert all(len(e) == 1 for e in out.prompt_logprobs[1:])  # k=0: only the prompt token
        assert len(out.outputs[0].token_ids) == 1  # max_tokens=1 still generates (the caller ignores it)


def test_prompt_logprobs_top_k_match_hf(llm, hf_model):
    prompts = [encode(llm, t) for t in TEXTS[1:]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=2, prompt_logprobs=5, logprobs=2, temperature=0),
                        use_tqdm=False)
    for ids, out in zip(prompts, outs):
        check_against_hf(out.prompt_logprobs, ids, hf_logprobs(hf_model, ids), k=5)
        assert len(out.outputs[0].logprobs) == 2  # sample logprobs are unaffected


def test_not_computed_unless_asked(llm):
    out = llm.generate([encode(llm, TEXTS[0])], SamplingParams(max_tokens=1, logprobs=1), use_tqdm=False)[0]
    assert out.prompt_logprobs is None


def test_single_token_prompt(llm):
    out = llm.generate([[504]], SamplingParams(max_tokens=1, prompt_logprobs=3), use_tqdm=False)[0]
    assert out.prompt_logprobs == [None]


# ---------------------------------------------------------------- chunked prefill, prefix cache, preemption
def test_chunked_prefill_gives_the_same_values(llm, hf_model):
    ids = encode(llm, LONG_TEXT)
    assert len(ids) > 200
    params = SamplingParams(max_tokens=3, prompt_logprobs=3, temperature=0)
    whole = llm.generate([ids], params, use_tqdm=False)[0].prompt_logprobs
    check_against_hf(whole, ids, hf_logprobs(hf_model, ids), k=3)
    # A token budget of 24: the prompt spans > 8 steps, next to a request that is decoding.
    engine = make_engine(llm, max_num_batched_tokens=24, max_num_seqs=4)
    other = encode(llm, TEXTS[0])
    outs = run_engine(engine, [other, ids], [SamplingParams(max_tokens=30, temperature=0), params])
    assert engine.metrics.steps > len(ids) // 24
    assert outs[0].prompt_logprobs is None
    assert_same(outs[1].prompt_logprobs, whole)


def test_row_chunks_of_the_log_softmax_give_the_same_values(llm, monkeypatch):
    ids = encode(llm, TEXTS[1])
    params = SamplingParams(max_tokens=1, prompt_logprobs=4, temperature=0)
    whole = llm.generate([ids], params, use_tqdm=False)[0].prompt_logprobs
    calls: list[int] = []
    original = llm.model.compute_logits

    def counting(hidden):
        calls.append(hidden.shape[0])
        return original(hidden)

    monkeypatch.setattr(model_runner, "PROMPT_LOGITS_CHUNK_ELEMENTS", llm.spec.vocab_size * 3)
    monkeypatch.setattr(llm.model, "compute_logits", counting)
    chunked = llm.generate([ids], params, use_tqdm=False)[0].prompt_logprobs
    assert max(calls) <= 3 and sum(calls) == len(ids) - 1 + 1  # 3 prompt rows at a time, then the sample row
    assert_same(chunked, whole)


def test_prefix_cache_hit_does_not_skip_prompt_rows(llm):
    tok = llm.get_tokenizer()
    prefix = tok.encode("You are a careful assistant. Answer briefly and precisely. " * 6)
    assert len(prefix) >= 48
    a = prefix + tok.encode(" Question: what is two plus two?")
    b = prefix + tok.encode(" Question: name a large city.")
    params = SamplingParams(max_tokens=1, prompt_logprobs=2, temperature=0)
    reference = run_engine(make_engine(llm, enable_prefix_caching=False), [b], params)[0].prompt_logprobs

    engine = make_engine(llm)
    run_engine(engine, [a], SamplingParams(max_tokens=1))  # caches the shared prefix
    hits, computed = engine.block_manager.prefix_hits, engine.metrics.prompt_tokens_computed
    first = run_engine(engine, [b], params)[0].prompt_logprobs
    assert engine.block_manager.prefix_hits == hits  # the cached prefix was not used...
    assert engine.metrics.prompt_tokens_computed - computed == len(b)  # ...every prompt row was computed
    assert_same(first, reference)
    again = run_engine(engine, [b], params)[0].prompt_logprobs  # the same prompt, now fully cached
    assert_same(again, first)
    # Requests without prompt logprobs still reuse the cache (which the prompt-logprobs runs filled too).
    hits = engine.block_manager.prefix_hits
    run_engine(engine, [b], SamplingParams(max_tokens=1))
    assert engine.block_manager.prefix_hits - hits >= len(prefix) // 16 * 16


def test_preemption_and_n_keep_prompt_logprobs(llm):
    prompts = [encode(llm, t) for t in TEXTS] + [encode(llm, LONG_TEXT)[:60]]
    params = SamplingParams(max_tokens=24, prompt_logprobs=1, temperature=0, ignore_eos=True)
    reference = run_engine(make_engine(llm), prompts, params)
    need = sum(len(p) + 24 for p in prompts)
    # Room for the longest sequence alone (a longer one could never finish), not for all at once.
    small = make_engine(llm, num_blocks=-(-max(len(p) + 24 for p in prompts) // 16) + 1)
    assert small.block_manager.num_blocks * 16 < need
    outs = run_engine(small, prompts, params)
    assert small.scheduler.num_preemptions > 0
    for got, ref in zip(outs, reference):
        assert got.outputs[0].token_ids == ref.outputs[0].token_ids
        assert_same(got.prompt_logprobs, ref.prompt_logprobs)
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks

    n2 = SamplingParams(n=2, max_tokens=4, prompt_logprobs=1, temperature=0.8, seed=1)
    out = run_engine(make_engine(llm), [prompts[0]], n2)[0]
    assert len(out.outputs) == 2
    assert_same(out.prompt_logprobs, reference[0].prompt_logprobs)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("value", [-1, 21, 1.0, True, "1"])
def test_invalid_prompt_logprobs_names_the_parameter(value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(prompt_logprobs=value)
    assert info.value.param == "prompt_logprobs"
    assert "prompt_logprobs" in str(info.value) and repr(value) in str(info.value)
