"""Async scheduling gives exactly the outputs of synchronous stepping.

The model is the bundled SmolLM2 on the CPU; where its GGUF is not installed (the GPU machine) a Llama-shaped
model with dummy weights and a byte-level chat tokenizer (``tests/helpers.dummy_chat_model_dir``), on CUDA when
there is a GPU: the same requests and assertions, and there the overlap is real. On the CPU nothing overlaps,
but the engine takes the same path it takes on a GPU: a step's
sampled tokens stay "pending", the next step is scheduled and launched with those tokens read
from the device tensor, and only then are they appended and checked for stops. Every test runs
the same requests synchronously and asynchronously and compares the whole outputs.
"""

from __future__ import annotations

import pytest

from dockyard import LLM, SamplingParams
from dockyard.engine.sequence import PENDING_TOKEN
from dockyard.errors import ModelNotFoundError
from dockyard.model_path import bundled_model_path

from ..helpers import dummy_chat_model_dir
from .test_engine import GREEDY, TOPICS, make_engine, prompts_of_varied_length, run

# The dummy stand-in's tokenizer learns its merges from the texts these tests send.
CORPUS = [f"Write about {topic}. Give many details. You are a careful assistant. Answer briefly and precisely. "
          "Question: what is two plus two? user assistant system You are a helpful AI assistant named SmolLM, "
          "trained by Hugging Face" for topic in TOPICS]


@pytest.fixture(scope="module")
def llm(request, tmp_path_factory):
    try:
        bundled_model_path()
    except ModelNotFoundError:  # no bundled GGUF here: the dummy-weight stand-in, on the GPU when there is one
        # The tests build engines of their own: the LLM's pool stays small, leaving the GPU's memory free for their
        # graph captures (a capture that finds memory short would have to free cached blocks, which it cannot).
        # float32 as on the CPU: some tests compare a request decoded in a batch with the same request alone, and
        # in bfloat16 random weights leave near-ties that the batch's different GEMM shapes break either way.
        return LLM(str(dummy_chat_model_dir(tmp_path_factory.mktemp("dummy-chat"), CORPUS)), load_format="dummy",
                   num_kv_blocks=64, dtype="float32")
    return request.getfixturevalue("bundled_llm")


def run_both(llm, prompts, params, **config):
    """(sync outputs, async outputs, async engine, step() calls that found a step in flight)."""
    results = []
    for async_scheduling in (False, True):
        engine = make_engine(llm, async_scheduling=async_scheduling, **config)
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for i, (p, sp) in enumerate(zip(prompts, params_list)):
            engine.add_request(f"r{i}", p, sp)
        done, overlapped = {}, 0
        for _ in range(5000):
            if not engine.has_unfinished_requests():
                break
            overlapped += engine._in_flight is not None
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in out.outputs]
        assert not engine.has_unfinished_requests()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        results.append(([done[f"r{i}"] for i in range(len(prompts))], engine, overlapped))
    (sync, _, sync_overlapped), (asyn, engine, overlapped) = results
    assert sync_overlapped == 0
    return sync, asyn, engine, overlapped


def test_mixed_requests_identical_to_synchronous(llm):
    prompts = prompts_of_varied_length(llm, 10)
    params = [
        GREEDY,
        SamplingParams(max_tokens=30, temperature=0.0),  # may stop at EOS
        SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7),
        SamplingParams(max_tokens=25, temperature=0.0, stop=[".", "\n"]),
        SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.7, top_k=20, seed=3, n=2),
        SamplingParams(max_tokens=18, temperature=0.0, min_tokens=10),
        SamplingParams(max_tokens=16, temperature=0.0, logprobs=2),  # needs the host: its steps run synchronously
        SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.3),
        SamplingParams(max_tokens=1, temperature=0.0),
    ]
    sync, asyn, engine, overlapped = run_both(llm, prompts, params, max_num_batched_tokens=64, max_num_seqs=6)
    assert asyn == sync
    assert overlapped > 10  # most decode steps really launched with the previous one in flight
    assert engine.metrics.generation_tokens == sum(len(c[0]) for out in sync for c in out)


def test_greedy_batch_overlaps_every_decode_step(llm):
    prompts = prompts_of_varied_length(llm, 4)
    sync, asyn, engine, overlapped = run_both(llm, prompts, GREEDY)
    assert asyn == sync
    # One prefill step, then every decode step launches with its predecessor in flight (23), and one
    # more call finds the last step in flight: applied before scheduling (every sequence ends there
    # by length), so no step is wasted.
    assert overlapped == GREEDY.max_tokens
    assert engine.metrics.steps == GREEDY.max_tokens


def test_preemption_with_async_scheduling(llm):
    """A pool too small for the batch: steps are applied before scheduling once blocks run short, so
    preemption and ending for lack of blocks never meet a pending token; outputs as synchronous."""
    prompts = prompts_of_varied_length(llm, 5)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    need = sum(len(p) + 24 for p in prompts)
    sync, asyn, engine, overlapped = run_both(llm, prompts, params, num_blocks=need // 16 // 3,
                                              enable_prefix_caching=False)
    assert asyn == sync
    assert engine.scheduler.num_preemptions > 0 and overlapped > 0


def test_prefix_cache_never_seals_a_pending_token(llm):
    tok = llm.get_tokenizer()
    prefix = tok.encode("You are a careful assistant. Answer briefly and precisely. " * 4)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    first = prefix + tok.encode(" Question: what is two plus two?")
    outputs = {}
    for async_scheduling in (False, True):
        engine = make_engine(llm, async_scheduling=async_scheduling)
        # The second prompt is the first one and its whole output: it can reuse every full block,
        # including those the generated tokens filled, which are sealed once the tokens arrive.
        a = run(engine, [first], params)[0]
        hits = engine.block_manager.prefix_hits
        b = run(engine, [first + a], params)[0]
        outputs[async_scheduling] = (a, b, engine.block_manager.prefix_hits - hits)
        chunks = [chunk for _, chunk in engine.block_manager.cached.values()]
        assert chunks and all(PENDING_TOKEN not in chunk for chunk in chunks)
    assert outputs[True] == outputs[False]
    assert outputs[True][2] == (len(first) + params.max_tokens - 1) // 16 * 16


def test_abort_while_in_flight(llm):
    prompts = prompts_of_varied_length(llm, 3)
    engine = make_engine(llm, async_scheduling=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None
    engine.abort_request("r1")
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(outs) == {"r0", "r2"}
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    alone = make_engine(llm, async_scheduling=False)
    alone.add_request("x", prompts[2], GREEDY)
    while alone.has_unfinished_requests():
        outs.update({o.request_id: o for o in alone.step() if o.finished})
    assert outs["r2"].outputs[0].token_ids == outs["x"].outputs[0].token_ids


def test_sequence_outgrowing_the_pool_keeps_its_last_token(llm):
    prompt = list(range(100, 220))  # 120 tokens; 24 more need 144 > the pool's 128 slots
    sync, asyn, _, _ = run_both(llm, [prompt, prompt[:20]], GREEDY, num_blocks=8, enable_prefix_caching=False)
    assert asyn == sync
    assert sync[0][0][2] == "length" and 0 < len(sync[0][0][0]) < 24
