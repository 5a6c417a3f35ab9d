"""Speculative decoding on CUDA with CUDA graphs: greedy tokens identical to the engine without speculation.

The CPU tests (``test_spec_decode.py``) pin exactness on the bundled model, where every step runs eagerly. Here
the verify steps replay the decode graphs (1 + k one-token rows per sequence) and the reference engine runs with
async scheduling and graphs, as on a real deployment. The model is the Llama-shaped dummy with a real BPE
tokenizer (``tests/helpers.dummy_chat_model_dir``) in float32: bfloat16 random weights leave near-ties that
different batch shapes round either way, which would make the comparison about rounding, not the verify
machinery. Both proposers: n-gram, and a draft model that is the target itself (its own KV cache, eager).
"""

from __future__ import annotations

import pytest
import torch

from dockyard import LLM, SamplingParams
from dockyard.engine.draft_model import DraftModelProposer
from dockyard.engine.llm_engine import LLMEngine
from dockyard.engine.speculative_config import SpeculativeConfig

from ..helpers import dummy_chat_model_dir
from .test_spec_decode import CHAT_TOPICS, COPY_PROMPTS, NGRAM, make_engine, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")

MAX_TOKENS = 48
NUM_PROMPTS = 8  # the mixed batch: half copying prompts, half chat


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    # A small pool of its own: the tests' engines allocate theirs (and capture their graphs) beside it.
    directory = dummy_chat_model_dir(tmp_path_factory.mktemp("dummy-chat"), COPY_PROMPTS + CHAT_TOPICS)
    return LLM(str(directory), load_format="dummy", device="cuda", dtype="float32", num_kv_blocks=64, seed=0)


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    tok = llm.get_tokenizer()
    chat = [tok.encode(llm.apply_chat_template([{"role": "user", "content": f"Write about {t}."}]),
                       add_special_tokens=False) for t in CHAT_TOPICS]
    half = NUM_PROMPTS // 2
    return [tok.encode(p) for p in COPY_PROMPTS[:half]] + chat[:half]


def _params() -> list[SamplingParams]:
    """Greedy; one request ends by length early, inside what may be an accepted run."""
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True) for _ in range(NUM_PROMPTS)]
    params[1] = SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True)
    return params


@pytest.fixture(scope="module")
def reference(llm, prompts) -> list[list[int]]:
    engine = make_engine(llm, None, max_num_seqs=NUM_PROMPTS)
    assert engine.async_scheduling and engine.runner.graphs is not None, engine.runner.eager_reason
    return [o.outputs[0].token_ids for o in run(engine, prompts, _params())]


def _spec_engine(llm: LLM, method: str, max_num_seqs: int) -> LLMEngine:
    if method == "ngram":
        return make_engine(llm, NGRAM, max_num_seqs=max_num_seqs)
    proposer = DraftModelProposer(llm.model, llm.spec, llm.spec, 512, 16, llm.device, llm.dtype, max_num_seqs,
                                  llm.spec.max_model_len)
    return make_engine(llm, SpeculativeConfig("draft_model", 3, model="self"), max_num_seqs=max_num_seqs,
                       proposer=proposer)


def _count_graph_rows(engine: LLMEngine) -> list[int]:
    """Rows of every graph replay of ``engine`` from now on (a verify step replays 1 + k rows per sequence)."""
    graphs = engine.runner.graphs
    assert graphs is not None, engine.runner.eager_reason
    rows: list[int] = []
    replay = graphs.run

    def counted(input_ids, *args, **kwargs):
        rows.append(len(input_ids))
        return replay(input_ids, *args, **kwargs)

    graphs.run = counted
    return rows


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_speculation_with_graphs_is_exact(llm, prompts, reference, method):
    """Batch 1 (one request at a time, max_num_seqs 1) and the mixed batch of all prompts at once: every
    request's tokens equal the reference's, verify steps replayed graphs, and proposals were accepted."""
    params = _params()
    single = _spec_engine(llm, method, max_num_seqs=1)
    single_rows = _count_graph_rows(single)
    for i, prompt in enumerate(prompts):
        assert run(single, [prompt], params[i])[0].outputs[0].token_ids == reference[i], f"batch 1, prompt {i}"
    assert max(single_rows) == 4  # a sequence's newest token and its 3 proposals in one replay
    batched = _spec_engine(llm, method, max_num_seqs=NUM_PROMPTS)
    batched_rows = _count_graph_rows(batched)
    outs = run(batched, prompts, params, check_blocks=True)
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == reference[i], f"mixed batch, prompt {i}"
    assert max(batched_rows) > NUM_PROMPTS
    for engine in (single, batched):
        stats = engine.stats()
        assert stats["spec_decode_num_accepted_tokens"] > 0, stats
        if method == "draft_model":  # the draft is the target: every guess stands unless rounding differs
            assert stats["spec_decode_acceptance_rate"] > 0.9, stats
        else:  # n-gram: not every sequence finds a match every step, so steps mix proposing and plain rows
            assert stats["spec_decode_num_drafts"] < stats["generation_tokens"], stats
