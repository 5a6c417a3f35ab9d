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
from dockyard.engine import sampler as sampler_module
from dockyard.errors import InvalidRequestError
from dockyard.structured_output.manager import StructuredOutputManager, allowed_token_mask, unpack_bitmask
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


def test_structural_tag_both_forms(llm):
    """vLLM's structures/triggers form and xgrammar's format form: free text outside the tags, the schema
    inside them (checked by replaying text through the engine's matcher)."""
    manager = make_engine(llm).structured_output
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    legacy = {"structures": [{"begin": "<fn>", "schema": schema, "end": "</fn>"}], "triggers": ["<fn>"]}
    current = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<fn>"], "tags": [
        {"type": "tag", "begin": "<fn>", "content": {"type": "json_schema", "json_schema": schema}, "end": "</fn>"}]}}
    tok = llm.get_tokenizer()
    for tag in (legacy, current):
        compiled = manager.compile(StructuredOutputsParams(structural_tag=json.dumps(tag))).result()

        def accepts(text: str, compiled=compiled) -> bool:  # noqa: ANN001 - xgrammar's CompiledGrammar
            matcher = manager.matcher(compiled)
            return all(matcher.accept(t) for t in tok.encode(text, add_special_tokens=False))

        assert accepts('It is <fn>{"city": "Paris"}</fn> there')
        assert not accepts('It is <fn>{"town": 3}</fn>')
    with pytest.raises(InvalidRequestError) as info:
        manager.compile(StructuredOutputsParams(structural_tag='{"type": "structural_tag", "format": {"type": "x"}}')
                        ).result()
    assert info.value.param == "structured_outputs.structural_tag"


def test_model_without_tokenizer_is_refused():
    with pytest.raises(InvalidRequestError, match="tokenizer") as info:
        StructuredOutputManager(None, 100, [0]).compile(StructuredOutputsParams(regex="a"))
    assert info.value.param == "structured_outputs"



def _first_end(tokens: list[int], end: list[int]) -> int | None:
    """How many tokens precede the first token after ``end`` in ``tokens`` (None: ``end`` does not occur)."""
    return next((i + len(end) for i in range(len(tokens) - len(end) + 1) if tokens[i:i + len(end)] == end), None)


def _reference_allowed(llm, compiled: xgr.CompiledGrammar, tokens: list[int]) -> np.ndarray:
    """[V] bool: what a fresh xgrammar matcher fed ``tokens`` allows next (its bitmask unpacked by numpy)."""
    ref = xgr.GrammarMatcher(compiled)
    assert all(ref.accept_token(t) for t in tokens)
    bitmask = xgr.allocate_token_bitmask(1, llm.spec.vocab_size)
    ref.fill_next_token_bitmask(bitmask)
    return np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:llm.spec.vocab_size].astype(bool)


def test_grammar_starts_after_the_reasoning_end(llm, chat_prompt, monkeypatch):
    """With reasoning_end_token_ids, each sample's mask is all-ones until its output holds the end sequence
    and from the next token on equals a fresh xgrammar matcher's (fed only the tokens after the end), step by
    step for n = 3 seeded samples; async scheduling gives the synchronous outputs."""
    tok = llm.get_tokenizer()
    end = tok.encode("</think>", add_special_tokens=False)[:2]  # two tokens: the samples meet it soon
    so = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True, reasoning_end_token_ids=end)
    # The bias makes the free part pick the end's tokens in random order until they form the sequence.
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=60, structured_outputs=so,
                            logit_bias={t: 100 for t in end})
    records: list[tuple[list[int], torch.Tensor | None]] = []
    real_mask = sampler_module.allowed_token_mask

    def recording(matchers, vocab_size, device):
        mask = real_mask(matchers, vocab_size, device)
        for row, m in enumerate(matchers):
            if m is not None:
                records.append((list(m.gate.tokens), None if mask is None else mask[row].clone()))
        return mask

    monkeypatch.setattr(sampler_module, "allowed_token_mask", recording)
    sync, asyn, _, _ = run_both(llm, [chat_prompt], params)
    assert asyn == sync
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(
        tok, vocab_size=llm.spec.vocab_size, stop_token_ids=list(llm.spec.eos_token_ids))).compile_json_schema(
        json.dumps(PERSON), any_whitespace=False)
    outputs = [s[0] for s in sync[0]]
    opened = [_first_end(out, end) for out in outputs]
    assert all(o is not None and o > len(end) for o in opened), opened  # each sample reasoned a while first
    assert any(s[2] == "stop" for s in sync[0])
    for token_ids, _text, reason, _ in sync[0]:
        if reason == "stop":  # the grammar ended the sample (EOS): what follows the end sequence is valid JSON
            jsonschema.validate(json.loads(tok.decode(token_ids[_first_end(token_ids, end):-1])), PERSON)
    free = constrained = 0
    for seen, row in records:
        assert any(out[:len(seen)] == seen for out in outputs)  # the matcher saw the sample's own tokens
        start = _first_end(seen, end)
        if start is None:
            assert row is None or row.all()
            free += 1
        else:
            assert row is not None and np.array_equal(row.numpy(), _reference_allowed(llm, compiled, seen[start:]))
            constrained += 1
    assert free >= len(outputs) + 2 and constrained >= len(outputs)
    # before the end, the samples wrote tokens the grammar would refuse at the start of a JSON value
    assert not _reference_allowed(llm, compiled, [])[end[0]]


def test_reasoning_gate_from_the_prompt_and_rollback(llm):
    """A prompt whose last end sequence follows its last start sequence has closed the reasoning (the grammar
    applies from the first token); rolling back across the end sequence gives the state of those tokens."""
    tok = llm.get_tokenizer()
    start, end = (tok.encode(s, add_special_tokens=False) for s in ("<think>", "</think>"))
    manager = make_engine(llm).structured_output
    so = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True, reasoning_end_token_ids=end,
                                 reasoning_start_token_ids=start)
    compiled = manager.compile(so).result()
    vocab = llm.spec.vocab_size
    closed = tok.encode("<think>\nold</think>x<think>\n\n</think>\n\n", add_special_tokens=False)
    still_open = tok.encode("<think>old</think>x<think>\n", add_special_tokens=False)
    assert manager.matcher(compiled, so, closed).active
    assert not manager.matcher(compiled, so, still_open).active
    assert allowed_token_mask([manager.matcher(compiled, so, still_open)], vocab, "cpu") is None
    reasoning = tok.encode("Hmm.", add_special_tokens=False) + end
    answer = tok.encode('{"name": "Al"', add_special_tokens=False)
    matcher = manager.matcher(compiled, so, still_open)
    for t in reasoning + answer:
        assert matcher.accept(t)
    want = torch.from_numpy(_reference_allowed(llm, compiled, answer))
    assert torch.equal(allowed_token_mask([matcher], vocab, "cpu")[0], want)
    assert not matcher.accept(end[0])  # the grammar holds now
    matcher.rollback(len(answer) + 1)  # back into the end sequence: free again
    assert not matcher.active
    for t in end[-1:] + answer[:2]:
        assert matcher.accept(t)
    assert torch.equal(allowed_token_mask([matcher], vocab, "cpu")[0],
                       torch.from_numpy(_reference_allowed(llm, compiled, answer[:2])))
    # Offline: a chat prompt that closed its think block is held to the grammar from the first token.
    text = llm.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}])
    prompt = tok.encode(text + "<think>\n\n</think>\n\n", add_special_tokens=False)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=60, structured_outputs=so),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), PERSON)
    with pytest.raises(InvalidRequestError, match="reasoning_end_token_ids"):
        StructuredOutputsParams(regex="a", reasoning_end_token_ids=[])
    with pytest.raises(InvalidRequestError, match="needs reasoning_end_token_ids"):
        StructuredOutputsParams(regex="a", reasoning_start_token_ids=[1])
