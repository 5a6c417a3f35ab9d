"""Speculative decoding on the bundled model: greedy output is token-for-token that of the same engine
without speculation (whose output equals HF's in test_real_model / test_engine), at batch 1 and at batch 16
mixed with sequences that have no proposals and with prefills; stops end where they do without it; the
KV blocks of rejected proposals go back to the pool. The rejection sampler's output distribution is
checked against the known target distribution with a chi-square test on a small vocabulary.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import chisquare

from dockyard import LLM, SamplingParams
from dockyard.engine.draft_model import DraftModelProposer
from dockyard.engine.llm_engine import EngineConfig, LLMEngine
from dockyard.engine.outputs import RequestOutput
from dockyard.engine.sampler import Sampler
from dockyard.engine.sequence import Sequence
from dockyard.engine.spec_decode import NgramProposer, Proposal, expanded_batch, verify
from dockyard.engine.speculative_config import SpeculativeConfig
from dockyard.engine_args import EngineArgs
from dockyard.errors import ConfigError
from dockyard.server.metrics import ServerStats, make_registry, render_metrics
from dockyard.structured_output.params import StructuredOutputsParams
from tests.helpers import poison

NGRAM = SpeculativeConfig("ngram", 3, prompt_lookup_min=1, prompt_lookup_max=3)
MAX_TOKENS = 128

# Text the model tends to continue by copying (lists, code, its own input) and open-ended chat prompts,
# where the n-gram proposer often finds nothing: a batch mixes speculating and non-speculating rows.
COPY_PROMPTS = [
    "Repeat this list exactly: apples, pears, plums, apples, pears, plums, apples, pears,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "The cat sat on the mat. The dog sat on the log. The cat sat on the",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday, Monday, Tuesday,",
    "for i in range(10):\n    print(i)\nfor j in range(10):\n    print(j)\nfor k in range(10):",
    "Summarise: The river rises in the hills. The river flows to the sea. Summary: The river",
    "a b c d e f g a b c d e f g a b c",
    "SELECT name FROM users WHERE id = 1;\nSELECT name FROM users WHERE id = 2;\nSELECT",
    "Rename x to y in: x = 1\nprint(x)\nx += 2\nprint(x)\nAnswer: y = 1\nprint(y)\n",
]
# Batch 1 costs a step per emitted run, one sequence at a time: two copying prompts and two chat prompts.
BATCH_1_PROMPTS = (0, 1, 10, 11)
DRAFT_PROMPTS, DRAFT_MAX_TOKENS = (0, 2, 4, 6, 10, 12, 14, 16), 64
CHAT_TOPICS = ["the ocean", "a small robot", "prime numbers", "coffee", "volcanoes", "chess", "honeybees",
               "glaciers", "jazz music", "bread baking"]


def make_engine(llm: LLM, speculative_config: SpeculativeConfig | None, max_num_seqs: int = 16,
                proposer: DraftModelProposer | None = None) -> LLMEngine:
    config = EngineConfig(max_num_seqs=max_num_seqs, speculative_config=speculative_config)
    return LLMEngine(llm.model, llm.spec, llm.tokenizer, config, llm.device, llm.dtype, 512, proposer=proposer)


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams,
        check_blocks: bool = False) -> list[RequestOutput]:
    """Every request's final output, in prompt order; with ``check_blocks``, after every step each running
    sequence holds no block past its tokens and has sealed only blocks of computed, known tokens."""
    per_request = params if isinstance(params, list) else [params] * len(prompts)
    first = engine.metrics.requests_added
    for i, (prompt, p) in enumerate(zip(prompts, per_request, strict=True)):
        engine.add_request(f"s{first + i}", prompt, p)
    done: dict[str, RequestOutput] = {}
    bs = engine.block_manager.block_size
    while engine.has_unfinished_requests():
        done.update((out.request_id, out) for out in engine.step(report_unfinished=False))
        for seq in engine.scheduler.running if check_blocks else ():
            assert not seq.spec_token_ids or seq.num_computed_tokens == len(seq) - 1
            # Rejected proposals' blocks were given back: none past the sequence's own tokens.
            assert len(seq.block_table) <= -(-len(seq) // bs), (len(seq.block_table), len(seq))
            assert len(seq.block_hashes) == min(seq.num_computed_tokens, seq.num_known_tokens) // bs
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [done[f"s{first + i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def prompts(bundled_llm) -> list[list[int]]:
    tok = bundled_llm.get_tokenizer()
    chat = [tok.encode(bundled_llm.apply_chat_template([{"role": "user", "content": f"Write about {t}."}]),
                       add_special_tokens=False) for t in CHAT_TOPICS]
    return [tok.encode(p) for p in COPY_PROMPTS] + chat


@pytest.fixture(scope="module")
def base_runs(bundled_llm, prompts) -> list[RequestOutput]:
    """20 prompts x 128 greedy tokens (EOS ends some) without speculation."""
    return run(make_engine(bundled_llm, None), prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))


@pytest.fixture(scope="module")
def greedy_runs(bundled_llm, prompts, base_runs):
    """The 20 prompts without speculation, with n-gram speculation at batch 16 (checking the blocks after every
    step) and at batch 1, and the speculating engines' stats."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    base = base_runs
    batched_engine = make_engine(bundled_llm, NGRAM, max_num_seqs=16)
    batched = run(batched_engine, prompts, params, check_blocks=True)
    single_engine = make_engine(bundled_llm, NGRAM, max_num_seqs=1)
    single = run(single_engine, [prompts[i] for i in BATCH_1_PROMPTS], params)
    return base, batched, single, batched_engine, single_engine


def _same(a: RequestOutput, b: RequestOutput) -> None:
    x, y = a.outputs[0], b.outputs[0]
    assert (x.token_ids, x.text, x.finish_reason, x.stop_reason) == (y.token_ids, y.text, y.finish_reason,
                                                                      y.stop_reason)


def test_greedy_ngram_is_exact_at_batch_16(greedy_runs):
    base, batched, _, engine, _ = greedy_runs
    stats = engine.stats()
    for a, b in zip(base, batched):
        _same(a, b)
    assert {o.outputs[0].finish_reason for o in base} == {"stop", "length"}  # EOS and max_tokens both end some
    # Speculation happened, and not in every row: steps mixed proposing and non-proposing sequences.
    assert stats["spec_decode_num_accepted_tokens"] > 0.2 * stats["generation_tokens"]
    assert 0 < stats["spec_decode_acceptance_rate"] < 1
    assert stats["spec_decode_num_drafts"] < stats["generation_tokens"]
    assert stats["steps"] < sum(len(o.outputs[0].token_ids) for o in base) // 16 + 2 * MAX_TOKENS


def test_greedy_ngram_is_exact_at_batch_1(greedy_runs):
    base, _, single, _, engine = greedy_runs
    stats = engine.stats()
    base = [base[i] for i in BATCH_1_PROMPTS]
    for a, b in zip(base, single):
        _same(a, b)
    generated = sum(len(o.outputs[0].token_ids) for o in base)
    # Fewer target forwards than tokens: the accepted proposals' share.
    assert stats["steps"] <= generated - stats["spec_decode_num_accepted_tokens"] + len(base)
    assert stats["spec_decode_mean_acceptance_length"] > 1.5
    copying = single[0].metrics  # per request: the list-copying prompt accepts most proposals
    assert copying["spec_decode_acceptance_rate"] > 0.5 and copying["spec_decode_mean_acceptance_length"] > 2


@pytest.mark.manual  # minutes of CPU: 20 x 128 tokens one request at a time, twice
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_is_exact_at_batch_1_on_all_20_prompts(bundled_llm, prompts, base_runs, method):
    """The whole Must show at batch 1 (the default suite's batch-1 test takes 4 of the prompts): every one of the
    20 prompts, 128 greedy tokens each, one request at a time, is token-for-token the output without
    speculation, with n-gram proposals and with the target itself as the draft model."""
    if method == "ngram":
        engine = make_engine(bundled_llm, NGRAM, max_num_seqs=1)
    else:
        proposer = DraftModelProposer(bundled_llm.model, bundled_llm.spec, bundled_llm.spec, 512, 16,
                                      bundled_llm.device, bundled_llm.dtype, 1, 2048)
        engine = make_engine(bundled_llm, SpeculativeConfig("draft_model", 3, model="bundled"), max_num_seqs=1,
                             proposer=proposer)
    outs = run(engine, prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    for a, b in zip(base_runs, outs):
        _same(a, b)
    stats = engine.stats()
    assert stats["spec_decode_num_accepted_tokens"] > 0
    assert stats["steps"] < sum(len(o.outputs[0].token_ids) for o in base_runs)  # fewer forwards than tokens


def test_spec_decode_metrics_use_vllms_names(greedy_runs):
    engine = greedy_runs[3]
    text = render_metrics(make_registry(engine, ServerStats(), "m", "vllm")).decode()
    values = {(s.name, s.labels.get("position")): s.value for family in text_string_to_metric_families(text)
              for s in family.samples}
    spec = engine.metrics.spec_decode
    assert values[("vllm:spec_decode_num_drafts_total", None)] == spec.num_drafts > 0
    assert values[("vllm:spec_decode_num_draft_tokens_total", None)] == spec.num_draft_tokens
    assert values[("vllm:spec_decode_num_accepted_tokens_total", None)] == spec.num_accepted_tokens
    per_pos = [values[("vllm:spec_decode_num_accepted_tokens_per_pos_total", str(i))] for i in range(3)]
    assert sum(per_pos) == spec.num_accepted_tokens and per_pos == sorted(per_pos, reverse=True)


def test_stops_end_where_they_do_without_speculation(bundled_llm, prompts, greedy_runs):
    """Stop strings, stop token ids and max_tokens taken from inside the reference outputs (so they cut
    inside an accepted run), and penalties with logprobs: identical with and without speculation."""
    base = greedy_runs[0]
    tok = bundled_llm.get_tokenizer()
    cases, chosen = [], []
    for i in range(3):
        out = base[i].outputs[0]
        cut = min(20 + 7 * i, len(out.token_ids) - 2)
        text = tok.decode(out.token_ids[:cut + 1])
        cases.append(SamplingParams(temperature=0.0, max_tokens=64, stop=[text[-3:]]))
        cases.append(SamplingParams(temperature=0.0, max_tokens=64, stop_token_ids=[out.token_ids[cut]]))
        cases.append(SamplingParams(temperature=0.0, max_tokens=cut + 1))
        cases.append(SamplingParams(temperature=0.0, max_tokens=48, repetition_penalty=1.2, frequency_penalty=0.3,
                                    logprobs=2, min_tokens=10))
        chosen.extend([prompts[i]] * 4)
    plain = run(make_engine(bundled_llm, None), chosen, cases)
    spec = run(make_engine(bundled_llm, NGRAM), chosen, cases, check_blocks=True)
    for a, b, p in zip(plain, spec, cases):
        _same(a, b)
        if p.logprobs:
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert la.keys() == lb.keys()
                assert np.allclose(list(la.values()), list(lb.values()), atol=1e-4)
    assert any(o.outputs[0].finish_reason == "stop" and isinstance(o.outputs[0].stop_reason, str) for o in spec)


def test_greedy_draft_model_is_exact(bundled_llm, prompts, greedy_runs):
    """Draft = the target model itself (its own KV cache): every guess is the target's argmax unless the
    one-token draft steps and the batched verify rows round differently; the output is the reference's."""
    base = greedy_runs[0]
    engine = make_engine(bundled_llm, SpeculativeConfig("draft_model", 3, model="bundled"),
                         proposer=DraftModelProposer(bundled_llm.model, bundled_llm.spec, bundled_llm.spec, 512, 16,
                                                     bundled_llm.device, bundled_llm.dtype, 16, 2048))
    params = SamplingParams(temperature=0.0, max_tokens=DRAFT_MAX_TOKENS)
    outs = run(engine, [prompts[i] for i in DRAFT_PROMPTS], params, check_blocks=True)
    for i, out in zip(DRAFT_PROMPTS, outs):
        assert out.outputs[0].token_ids == base[i].outputs[0].token_ids[:DRAFT_MAX_TOKENS]
    stats = engine.stats()
    assert stats["spec_decode_acceptance_rate"] > 0.9
    assert not engine.proposer.shadows and engine.proposer.block_manager.num_free_blocks == 512


def test_llm_takes_a_draft_model_speculative_config(bundled_llm, bundled_gguf):
    """The user's path: LLM(speculative_config=...) loads the draft checkpoint beside the target's."""
    config = {"method": "draft_model", "model": str(bundled_gguf), "num_speculative_tokens": 2}
    llm = LLM(dtype="float32", device="cpu", speculative_config=json.dumps(config))
    params = SamplingParams(temperature=0.0, max_tokens=12)
    prompt = COPY_PROMPTS[1]
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == bundled_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert out.metrics["spec_decode_acceptance_rate"] > 0.5
    assert llm.engine.stats()["spec_decode_num_drafts"] > 0


def test_seeded_sampling_is_reproducible_and_n_gt_1(bundled_llm, prompts):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16, seed=7, n=2)
    first = run(make_engine(bundled_llm, NGRAM), prompts[:2], params)
    again = run(make_engine(bundled_llm, NGRAM), prompts[:2], params)
    for a, b in zip(first, again):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
        assert len(a.outputs) == 2


def test_grammar_constrained_requests_beside_speculating_ones(bundled_llm, prompts):
    """A JSON-schema request in a speculating engine is not speculated on and gives what it gives without
    speculation (parsing against its schema); the plain requests beside it still speculate, exactly."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    constrained = SamplingParams(temperature=0.0, max_tokens=24,
                                 structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True))
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    batch = [prompts[0], prompts[2], prompts[1]]
    params = [plain, constrained, plain]
    base = run(make_engine(bundled_llm, None), batch, params)
    engine = make_engine(bundled_llm, NGRAM)
    spec = run(engine, batch, params, check_blocks=True)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in base]
    assert set(json.loads(spec[1].outputs[0].text)) == {"n"}
    assert engine.stats()["spec_decode_num_draft_tokens"] > 0


def test_a_request_failing_in_a_verify_step_fails_alone(bundled_llm, prompts):
    """A bad value slipped past validation fails its own request inside the verify step (the min_tokens
    mask of its rows); the others finish as they would have alone."""
    params = [SamplingParams(temperature=0.0, max_tokens=24) for _ in range(2)]
    base = run(make_engine(bundled_llm, None), prompts[:2], params)
    engine = make_engine(bundled_llm, NGRAM)
    params.append(SamplingParams(temperature=0.0, max_tokens=24, min_tokens=20))
    for i, p in enumerate(params):
        engine.add_request(f"f{i}", prompts[i], p)
    done = {out.request_id: out for out in engine.step(report_unfinished=False)}  # the prefills
    poison(params[2], "mask")
    while engine.has_unfinished_requests():
        done.update((out.request_id, out) for out in engine.step(report_unfinished=False))
    for i in range(2):
        assert done[f"f{i}"].error is None
        assert done[f"f{i}"].outputs[0].token_ids == base[i].outputs[0].token_ids
    assert done["f2"].error is not None and done["f2"].outputs[0].finish_reason == "error"
    assert len(done["f2"].outputs[0].token_ids) == 1  # it failed after its prefill, in the first verify step
    assert engine.metrics.spec_decode.num_drafts > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# ---- the rejection sampler's distribution ----
VOCAB = 6


def _fake_seqs(count: int, params: SamplingParams) -> list[Sequence]:
    return [Sequence(i, str(i), 0, [0], params, 10**6) for i in range(count)]


@pytest.mark.parametrize("draft", ["distribution", "point_mass"])
def test_rejection_sampling_preserves_the_target_distribution(draft):
    """Two verified rows per sequence with known target (p0, p1) and draft (q0, q1) distributions. The first
    emitted token must be distributed as p0 and, when the proposal was accepted, the second as p1
    (chi-square, 100,000 samples: a 1% absolute bias in any token's probability would fail it)."""
    gen = torch.Generator().manual_seed(0)
    p_logits = torch.randn(2, VOCAB, generator=gen, dtype=torch.float64) * 1.5
    q = torch.softmax(torch.randn(2, VOCAB, generator=gen, dtype=torch.float64) * 1.5, dim=-1)
    p = torch.softmax(p_logits, dim=-1)
    n = 100_000
    params = SamplingParams(temperature=1.0, max_tokens=100)
    seqs = _fake_seqs(n, params)
    torch.manual_seed(1)
    if draft == "distribution":
        d0 = torch.multinomial(q[0], n, replacement=True)
        d1 = torch.multinomial(q[1], n, replacement=True)
        proposals = [Proposal([int(a), int(b)], q.float()) for a, b in zip(d0, d1)]
    else:  # a deterministic proposer: the same guess every time
        proposals = [Proposal([2, 4]) for _ in range(n)]
    logits = torch.cat([p_logits.float(), torch.zeros(1, VOCAB)]).repeat(n, 1)  # 3rd row: the bonus position
    batch = expanded_batch(seqs, [pr.token_ids for pr in proposals], [], torch.device("cpu"))
    out = verify(logits, seqs, proposals, batch, Sampler.apply_logits_rules)
    tokens = out.sampled.token_ids.view(n, 3)
    emitted = out.num_emitted
    first = np.bincount(tokens[:, 0].numpy(), minlength=VOCAB)
    assert chisquare(first, p[0].numpy() * n).pvalue > 1e-3
    second = np.bincount(tokens[emitted >= 2, 1].numpy(), minlength=VOCAB)
    assert chisquare(second, p[1].numpy() * second.sum()).pvalue > 1e-3
    # The test has the power it claims: the same counts against p0 shifted by 1% fail it.
    shifted = p[0].numpy().copy()
    shifted[0] += 0.01
    shifted[1] -= 0.01
    assert chisquare(first, shifted * n).pvalue < 1e-3


def test_verify_greedy_accepts_the_argmax_run():
    logits = torch.tensor([[0., 5, 0, 0], [0, 0, 5, 0], [5, 0, 0, 0], [0, 0, 0, 5]])
    seqs = _fake_seqs(1, SamplingParams(temperature=0.0))
    for proposal, expect in (([1, 2, 3], [1, 2, 0]), ([1, 2, 0], [1, 2, 0, 3]), ([3, 2, 0], [1])):
        batch = expanded_batch(seqs, [proposal], [], torch.device("cpu"))
        out = verify(logits, seqs, [Proposal(proposal)], batch, Sampler.apply_logits_rules)
        assert out.sampled.token_ids[:int(out.num_emitted[0])].tolist() == expect


# ---- the proposer and the config ----
def test_ngram_lookup_takes_the_latest_longest_match():
    proposer = NgramProposer(SpeculativeConfig("ngram", 3, prompt_lookup_min=1, prompt_lookup_max=2))
    assert proposer.lookup([1, 2, 3, 9, 1, 2, 4, 5, 7, 1, 2], 3) == [4, 5, 7]
    assert proposer.lookup([5, 6, 7], 3) == []
    assert proposer.lookup([3, 1, 8, 3], 2) == [1, 8]


@pytest.mark.parametrize("value, words", [
    ('{"method": "eagle", "num_speculative_tokens": 2}', "method"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
    ('{"method": "ngram"}', "num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "foo": 1}', "foo"),
    ('{"method": "draft_model", "num_speculative_tokens": 2}', "model"),
    ("ngram", "not JSON"),
])
def test_bad_speculative_config_is_refused_by_name(value, words):
    with pytest.raises(ConfigError, match=words):
        EngineArgs(speculative_config=value)


def test_speculative_config_flag_parses():
    import argparse

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}'])
    assert EngineArgs.from_cli_args(args).speculative_config == SpeculativeConfig("ngram", 4)
