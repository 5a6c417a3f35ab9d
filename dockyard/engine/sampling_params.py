"""SamplingParams: how one request is decoded.

Field names and defaults follow vLLM's ``SamplingParams``, so code written for vLLM ports by
changing the import. Every value is checked when the object is made: a bad value raises
:class:`~dockyard.errors.InvalidRequestError` naming the parameter, the value and the allowed
range, with ``.param`` set to the field name.

Limits (so that every value fits what the sampler's tensors can hold): ``n`` <= 128;
``logprobs`` / ``prompt_logprobs`` <= 20; ``max_tokens``, ``min_tokens``, ``top_k`` and every stop
token id <= 2**31 - 1; ``temperature`` in [0, 1e4]; ``repetition_penalty`` in (0, 1e4];
``presence_penalty`` / ``frequency_penalty`` in [-2, 2]; ``top_p`` in (0, 1]; ``min_p`` in [0, 1];
``seed`` any 64-bit value, signed or unsigned (reduced modulo 2**64). Floats must be finite.
What depends on the model is checked when the engine takes the request
(:meth:`check_for_vocab`): ``top_k`` <= vocab size, stop token ids and ``logit_bias`` ids in
[0, vocab size).

``structured_outputs`` (:class:`~dockyard.structured_output.params.StructuredOutputsParams`, or a dict
of its fields) holds the output to a JSON schema, regex, choice or grammar; ``logit_bias`` maps token
ids to a value added to their logits, clamped to [-100, 100] as OpenAI's API clamps it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dockyard.errors import InvalidRequestError
from dockyard.structured_output.params import StructuredOutputsParams

# Below this temperature a request is decoded greedily (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_N = 128
MAX_LOGPROBS = 20
MAX_INT = 2**31 - 1  # token counts, top_k and token ids: int32 on every device
MAX_TEMPERATURE = 1e4
MAX_REPETITION_PENALTY = 1e4
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
LOGIT_BIAS_LIMIT = 100.0  # logit_bias values are clamped to [-LIMIT, LIMIT]


def _bad(name: str, value: Any, rule: str) -> InvalidRequestError:
    return InvalidRequestError(f"{name} must be {rule}, got {value!r}", param=name)


def _check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None, rule: str = "") -> int:
    """``value`` as an int within [lo, hi]; bools and non-integers are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _bad(name, value, f"an integer {rule}".rstrip())
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(name, value, rule)
    return value


def _check_float(name: str, value: Any, ok: Any, rule: str) -> float:
    """``value`` as a finite float for which ``ok(value)`` holds; bools and non-numbers are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(name, value, f"a number {rule}")
    value = float(value)
    if not math.isfinite(value) or not ok(value):
        raise _bad(name, value, rule)
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, value, "True or False")
    return value


@dataclass
class SamplingParams:
    """Decoding parameters of one request (vLLM-compatible names and defaults).

    ``temperature=0`` means greedy decoding; ``top_k`` of 0 or -1 and ``top_p=1`` disable those
    filters; ``logprobs=k`` asks for the sampled token's log-probability plus the ``k`` most likely
    alternatives at every step; ``prompt_logprobs=k`` asks for every prompt token's log-probability
    given the tokens before it, plus the ``k`` most likely tokens at that position, under the raw
    model distribution (``RequestOutput.prompt_logprobs``); ``max_tokens=None`` generates up to the
    model's maximum length.
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        self.n = _check_int("n", self.n, 1, MAX_N, f">= 1 and <= {MAX_N}")
        if self.max_tokens is not None:
            self.max_tokens = _check_int("max_tokens", self.max_tokens, 1, MAX_INT,
                                         f">= 1 and <= {MAX_INT} (or None)")
        self.temperature = _check_float("temperature", self.temperature, lambda v: 0 <= v <= MAX_TEMPERATURE,
                                        f"in [0, {MAX_TEMPERATURE:g}] and finite (0 means greedy)")
        self.top_p = _check_float("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        self.top_k = _check_int("top_k", self.top_k, -1, MAX_INT,
                                ">= 0 and <= the vocabulary size, or -1 (0 and -1 disable top-k)")
        self.min_p = _check_float("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1]")
        if self.seed is not None:
            self.seed = _check_int("seed", self.seed, _SEED_MIN, _SEED_MAX,
                                   f"in [{_SEED_MIN}, {_SEED_MAX}] (or None)")
        self.stop = self._normalize_stop(self.stop)
        self.stop_token_ids = self._normalize_stop_token_ids(self.stop_token_ids)
        self.ignore_eos = _check_bool("ignore_eos", self.ignore_eos)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, _check_int(name, getattr(self, name), 0, MAX_LOGPROBS,
                                               f">= 0 and <= {MAX_LOGPROBS} (or None)"))
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, _check_float(name, getattr(self, name), lambda v: -2 <= v <= 2, "in [-2, 2]"))
        self.repetition_penalty = _check_float(
            "repetition_penalty", self.repetition_penalty, lambda v: 0 < v <= MAX_REPETITION_PENALTY,
            f"in (0, {MAX_REPETITION_PENALTY:g}] and finite (1 disables it)")
        self.min_tokens = _check_int("min_tokens", self.min_tokens, 0, MAX_INT, f">= 0 and <= {MAX_INT}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
                param="min_tokens",
            )
        self.skip_special_tokens = _check_bool("skip_special_tokens", self.skip_special_tokens)
        self.include_stop_str_in_output = _check_bool(
            "include_stop_str_in_output", self.include_stop_str_in_output
        )
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        self.logit_bias = self._normalize_logit_bias(self.logit_bias)

    @staticmethod
    def _normalize_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, Sequence) or isinstance(items, bytes | bytearray):
            raise _bad("stop", stop, "a string or a list of strings (or None)")
        out = []
        for s in items:
            if not isinstance(s, str):
                raise _bad("stop", stop, "a string or a list of strings (or None)")
            if not s:
                raise _bad("stop", stop, "non-empty strings")
            out.append(s)
        return out

    @staticmethod
    def _normalize_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        if isinstance(ids, str | bytes | bytearray) or not isinstance(ids, Sequence):
            raise _bad("stop_token_ids", ids, "a list of token ids >= 0 (or None)")
        out = []
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t <= MAX_INT:
                raise _bad("stop_token_ids", ids, "a list of token ids in [0, vocabulary size) (or None)")
            out.append(int(t))
        return out

    @staticmethod
    def _normalize_logit_bias(bias: Any) -> dict[int, float] | None:
        """``{token id: bias}`` with int ids >= 0 (decimal strings accepted, as JSON keys are strings) and
        finite values clamped to [-100, 100]; None or empty: no bias."""
        if not bias:
            return None
        if not isinstance(bias, dict):
            raise _bad("logit_bias", bias, "a mapping of token ids to numbers (or None)")
        out = {}
        for key, value in bias.items():
            tid = int(key) if isinstance(key, str) and key.strip().isdigit() else key
            if isinstance(tid, bool) or not isinstance(tid, numbers.Integral) or not 0 <= tid <= MAX_INT:
                raise InvalidRequestError(f"logit_bias keys must be token ids >= 0, got {key!r}", param="logit_bias")
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise InvalidRequestError(f"logit_bias values must be finite numbers, got {value!r} for token {key!r}",
                                          param="logit_bias")
            out[int(tid)] = min(max(float(value), -LOGIT_BIAS_LIMIT), LOGIT_BIAS_LIMIT)
        return out

    def check_for_vocab(self, vocab_size: int) -> None:
        """Refuse what this model's vocabulary cannot honour: ``top_k`` above the vocabulary size, stop
        token ids and ``logit_bias`` ids outside ``[0, vocab_size)`` (InvalidRequestError naming the
        parameter)."""
        if self.top_k > vocab_size:
            raise InvalidRequestError(
                f"top_k must be <= the vocabulary size ({vocab_size}), or 0 / -1 to disable it, got {self.top_k}",
                param="top_k")
        bad = [t for t in self.stop_token_ids or () if t >= vocab_size]
        if bad:
            raise InvalidRequestError(
                f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size}); give ids the model has",
                param="stop_token_ids")
        bad = sorted(t for t in self.logit_bias or () if t >= vocab_size)
        if bad:
            raise InvalidRequestError(
                f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {vocab_size}); give ids the model has",
                param="logit_bias")

    @property
    def greedy(self) -> bool:
        """True when the request decodes greedily (temperature below 1e-5, as in vLLM)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def uses_penalties(self) -> bool:
        """True when a repetition, presence or frequency penalty changes the logits."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def min_tokens_reached(self, num_output_tokens: int) -> bool:
        """The ``min_tokens`` rule: whether a stop (EOS, a stop token id, a stop string) may end the
        request once it has ``num_output_tokens`` output tokens. The sampler bans stop tokens while it
        does not hold for the tokens generated before the draw; stops are checked against it after."""
        return num_output_tokens >= self.min_tokens

    def needs_host_tokens(self, num_output_tokens: int) -> bool:
        """Whether sampling this request's next token, ``num_output_tokens`` generated so far, needs them
        on the host: logprobs (reported per token), penalties (they count the output), stop tokens
        still banned by ``min_tokens``, or a structured-output grammar (its matcher advances by each
        token before the next mask). A greedy request that needs none, and no logit bias, takes the plain
        argmax of the logits, and async scheduling may launch its next step before its newest token is
        read back."""
        return (self.logprobs is not None or self.uses_penalties or self.structured_outputs is not None
                or not self.min_tokens_reached(num_output_tokens))
