"""SamplingParams: vLLM defaults, normalization, and one rejection per validation rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dockyard.engine.sampling_params import SamplingParams
from dockyard.errors import InvalidRequestError


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    expected = dict(
        n=1, max_tokens=16, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=[],
        stop_token_ids=[], ignore_eos=False, logprobs=None, prompt_logprobs=None,
        presence_penalty=0.0, frequency_penalty=0.0,
        repetition_penalty=1.0, min_tokens=0, skip_special_tokens=True, include_stop_str_in_output=False,
    )
    for name, value in expected.items():
        assert getattr(p, name) == value, name
    assert not p.greedy


def test_stop_normalization() -> None:
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=["a", "bc"]).stop == ["a", "bc"]
    assert SamplingParams(stop=("a",)).stop == ["a"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(stop_token_ids=[np.int64(7)]).stop_token_ids == [7]
    assert type(SamplingParams(stop_token_ids=[np.int64(7)]).stop_token_ids[0]) is int


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=9e-6).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    assert not SamplingParams(temperature=0.7).greedy


def test_numbers_are_coerced() -> None:
    p = SamplingParams(temperature=1, top_p=1, min_p=0, repetition_penalty=2, seed=np.int32(5))
    assert type(p.temperature) is float and type(p.top_p) is float and type(p.repetition_penalty) is float
    assert p.seed == 5 and type(p.seed) is int


@pytest.mark.parametrize("kwargs", [
    dict(n=1), dict(n=128), dict(max_tokens=1), dict(max_tokens=None), dict(max_tokens=10**6),
    dict(temperature=0.0), dict(temperature=100.0), dict(top_p=1e-9), dict(top_p=1.0),
    dict(top_k=-1), dict(top_k=0), dict(top_k=1), dict(top_k=10**6), dict(min_p=0.0), dict(min_p=1.0),
    dict(seed=0), dict(seed=-(2**63)), dict(seed=2**64 - 1), dict(stop=None), dict(stop=[]),
    dict(stop_token_ids=[0]), dict(logprobs=0), dict(logprobs=20),
    dict(prompt_logprobs=0), dict(prompt_logprobs=20),
    dict(presence_penalty=-2.0), dict(presence_penalty=2.0), dict(frequency_penalty=-2.0),
    dict(frequency_penalty=2), dict(repetition_penalty=1e-3), dict(repetition_penalty=10.0),
    dict(min_tokens=0), dict(min_tokens=16), dict(max_tokens=None, min_tokens=1000),
    dict(ignore_eos=True), dict(skip_special_tokens=False), dict(include_stop_str_in_output=True),
])
def test_valid_edge_values_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)


INVALID = [
    ("n", 0), ("n", 129), ("n", 2.0), ("n", True), ("n", "2"),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 1.5),
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan), ("temperature", "hot"),
    ("temperature", None), ("temperature", True),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.01), ("top_p", math.nan), ("top_p", "1"),
    ("top_k", -2), ("top_k", 1.0), ("top_k", None),
    ("min_p", -0.01), ("min_p", 1.01), ("min_p", math.nan),
    ("seed", 1.0), ("seed", "42"), ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", False),
    ("stop", ""), ("stop", ["ok", ""]), ("stop", [1]), ("stop", 5), ("stop", b"x"),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["1"]), ("stop_token_ids", 3), ("stop_token_ids", [1.0]),
    ("ignore_eos", 1), ("ignore_eos", "yes"),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 1.0),
    ("prompt_logprobs", -1), ("prompt_logprobs", 21), ("prompt_logprobs", 1.0), ("prompt_logprobs", True),
    ("presence_penalty", 2.01), ("presence_penalty", -2.01), ("presence_penalty", math.inf),
    ("frequency_penalty", 3.0), ("frequency_penalty", -3.0), ("frequency_penalty", "0"),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", 0.5),
    ("skip_special_tokens", None), ("include_stop_str_in_output", 0),
]


@pytest.mark.parametrize(("field", "value"), INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_rejected(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
    message = str(info.value)
    assert field in message
    assert repr(value) in message or str(value) in message or field == "min_tokens"


def test_min_tokens_message_names_both_limits() -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert info.value.param == "min_tokens"
    assert "max_tokens" in str(info.value) and "4" in str(info.value) and "5" in str(info.value)
