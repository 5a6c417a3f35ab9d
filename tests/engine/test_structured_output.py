"""Structured outputs in the engine: the sampler's mask against xgrammar's own matcher, generation held to
the grammar (n > 1, async scheduling, grammars compiling off the step), logit_bias (bundled model, CPU).

References: the mask is compared with what a fresh xgrammar matcher accepts token by token
(``accept_token``, a different code path from ``fill_next_token_bitmask`` and our unpacking); outputs are
checked with ``jsonschema`` / ``re`` and by replaying them through a fresh matcher.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import Future

import jsonschema
import numpy as np
import pytest
import torch
import xgrammar as xgr

from dockyard import SamplingParams
from dockyard.errors import InvalidRequestError
from dockyard.structured_output.manager import allowed_token_mask, unpack_bitmask
from dockyard.structured_output.params import StructuredOutputsParams

from .test_async_scheduling import run_both
from .test_engine import make_engine

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog"]}, "maxItems": 2}},
    "required": ["name", "age"]}


@pytest.fixture(scope="module")
def llm(bundled_llm):
    return bundled_llm


@pytest.fixture(scope="module")
def chat_prompt(llm):
    text = llm.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}])
    return llm.get_tokenizer().encode(text, add_special_tokens=False)


def reference_matcher(llm, so: StructuredOutputsParams) -> xgr.GrammarMatcher:
    """A matcher built here from xgrammar directly (not through the engine's backend)."""
    info = xgr.TokenizerInfo.from_huggingface(llm.get_tokenizer(), vocab_size=llm.spec.vocab_size,
                                              stop_token_ids=list(llm.spec.eos_token_ids))
    compiler = xgr.GrammarCompiler(info)
    if so.json is not None:
        return xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(so.schema),
                                                               any_whitespace=not so.disable_any_whitespace))
    return xgr.GrammarMatcher(compiler.compile_regex(so.regex))


def test_unpack_bitmask_matches_numpy():
    rng = np.random.default_rng(0)
    words = rng.integers(-(2**31), 2**31, size=(3, 5), dtype=np.int64).astype(np.int32)
    expected = np.unpackbits(words.view(np.uint8), bitorder="little").reshape(3, -1)[:, :150].astype(bool)
    assert np.array_equal(unpack_bitmask(torch.from_numpy(words), 150).numpy(), expected)


def test_mask_is_what_the_matcher_accepts(llm):
    """At several states of a JSON schema, the engine's mask allows exactly the tokens a fresh matcher
    accepts one by one (over the whole vocabulary)."""
    so = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
    manager = make_engine(llm).structured_output
    compiled = manager.compile(so).result()
    reference = reference_matcher(llm, so)
    vocab = llm.spec.vocab_size
    prefix = llm.get_tokenizer().encode('{"name": "Al", "age": 4', add_special_tokens=False)
    for step in (0, 1, len(prefix) // 2, len(prefix)):
        matcher = manager.matcher(compiled)
        reference.reset()
        for t in prefix[:step]:
            assert matcher.accept(t) and reference.accept_token(t)
        mask = allowed_token_mask([None, matcher], vocab, "cpu")
        assert mask[0].all()  # a row without a matcher is free
        accepted = torch.zeros(vocab, dtype=torch.bool)
        for t in range(vocab):
            if reference.accept_token(t):
                accepted[t] = True
                reference.rollback(1)
        assert 0 < accepted.sum() < vocab
        assert torch.equal(mask[1], accepted), f"after {step} tokens"
    # several rows filled at once (xgrammar's threads) give each row's own mask
    matchers = [manager.matcher(compiled) for _ in prefix]
    for i, m in enumerate(matchers):
        for t in prefix[:i]:
            assert m.accept(t)
    together = allowed_token_mask([None, *matchers], vocab, "cpu")
    assert together[0].all()
    for i, m in enumerate(matchers):
        assert torch.equal(together[i + 1], allowed_token_mask([m], vocab, "cpu")[0])
    # rollback(k) takes the matcher k tokens back, mask included (speculative decoding's rejected drafts)
    matcher = manager.matcher(compiled)
    for t in prefix[:2]:
        assert matcher.accept(t)
    before = allowed_token_mask([matcher], vocab, "cpu")
    for t in prefix[2:]:
        assert matcher.accept(t)
    assert not torch.equal(allowed_token_mask([matcher], vocab, "cpu"), before)
    matcher.rollback(len(prefix) - 2)
    assert torch.equal(allowed_token_mask([matcher], vocab, "cpu"), before)


def test_generation_follows_the_grammar_n_samples(llm, chat_prompt):
    """n > 1 samples of a JSON schema and a regex, batched with an unconstrained request: each sample is
    valid and ends at EOS (the grammar terminated), and async scheduling gives the synchronous outputs."""
    schema = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
    regex = StructuredOutputsParams(regex=r"[A-Z][a-z]{2,6} (19|20)[0-9]{2}")
    params = [SamplingParams(n=3, temperature=0.9, seed=5, max_tokens=80, structured_outputs=schema),
              SamplingParams(n=2, temperature=1.0, seed=2, max_tokens=30, structured_outputs=regex),
              SamplingParams(temperature=0, max_tokens=12)]
    sync, asyn, _, _ = run_both(llm, [chat_prompt] * 3, params, max_num_seqs=8)
    assert asyn == sync
    eos = set(llm.spec.eos_token_ids)
    for token_ids, text, reason, _ in sync[0]:
        assert reason == "stop" and token_ids[-1] in eos
        jsonschema.validate(json.loads(text), PERSON)
    assert len({s[1] for s in sync[0]}) > 1  # seeded samples differ
    for token_ids, text, reason, _ in sync[1]:
        assert reason == "stop" and re.fullmatch(regex.regex, text), text
        ref = reference_matcher(llm, regex)
        assert all(ref.accept_token(t) for t in token_ids) and ref.is_terminated()


def test_request_waits_for_its_grammar_while_others_run(llm, chat_prompt):
    engine = make_engine(llm)
    so = StructuredOutputsParams(choice=["alpha", "beta"])
    compiled = engine.structured_output.compile(so).result()
    held: Future = Future()
    engine.structured_output.compile = lambda params: held  # compilation "still running"
    engine.add_request("grammar", chat_prompt, SamplingParams(temperature=0, max_tokens=10, structured_outputs=so))
    engine.add_request("plain", chat_prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    finished = {}
    for _ in range(4):
        for out in engine.step():
            finished[out.request_id] = out
    assert finished["plain"].finished and "grammar" not in finished
    assert not engine.scheduler.running and not engine.scheduler.waiting  # never scheduled yet
    held.set_result(compiled)
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished[out.request_id] = out
    assert finished["grammar"].outputs[0].text in ("alpha", "beta")
    assert finished["grammar"].outputs[0].finish_reason == "stop"


def test_bad_grammar_is_refused(llm, chat_prompt):
    with pytest.raises(InvalidRequestError) as info:
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "nope"})))
    assert info.value.param == "structured_outputs.json" and "nope" in str(info.value)
    # Reached by the engine (a caller that skipped the check): that request fails alone.
    engine = make_engine(llm)
    engine.add_request("bad", chat_prompt, SamplingParams(structured_outputs={"grammar": "root ::= undefined_rule"}))
    engine.add_request("ok", chat_prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id] = out
    error = outs["bad"].error
    assert isinstance(error, InvalidRequestError) and error.param == "structured_outputs.grammar"
    assert len(outs["ok"].outputs[0].token_ids) == 3


@pytest.mark.parametrize("bad, message", [
    ({}, "exactly one"), ({"json": {}, "regex": "a"}, "exactly one"), ({"choice": []}, "choice"),
    ({"json": "{not json"}, "not valid JSON"), ({"regex": "a", "whitespace_pattern": " "}, "whitespace_pattern"),
    ({"regex": "a", "colour": 1}, "unknown fields")])
def test_structured_outputs_params_checks(bad, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(structured_outputs=bad)


def test_logit_bias(llm, chat_prompt):
    greedy = llm.generate([chat_prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    first = greedy.outputs[0].token_ids[0]
    pushed = llm.generate([chat_prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                        logit_bias={"42": 250}), use_tqdm=False)[0]
    assert pushed.outputs[0].token_ids == [42] * 4
    banned = llm.generate([chat_prompt], SamplingParams(temperature=0, max_tokens=1, logit_bias={first: -100}),
                          use_tqdm=False)[0]
    assert banned.outputs[0].token_ids[0] != first
    assert SamplingParams(logit_bias={"7": 250, 8: -1e9}).logit_bias == {7: 100.0, 8: -100.0}
    with pytest.raises(InvalidRequestError, match="outside the vocabulary") as info:
        llm.generate([chat_prompt], SamplingParams(logit_bias={llm.spec.vocab_size: 1}), use_tqdm=False)
    assert info.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError, match="token ids >= 0"):
        SamplingParams(logit_bias={"-3": 1})
