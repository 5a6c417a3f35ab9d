"""Results handed back to users, with vLLM's names (RequestOutput, CompletionOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated sample of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    # Per generated token: {token_id: logprob} for the sampled token and the top-k alternatives.
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class RequestOutput:
    """A request's prompt and its samples so far (final when ``finished``).

    ``prompt_logprobs`` is set when the request's ``SamplingParams.prompt_logprobs`` is: one entry per
    prompt token. Entry 0 is None (nothing precedes the first token); entry ``i`` maps prompt token
    ``i`` to its log-probability given the tokens before it, then the ``k`` most likely tokens at that
    position by descending log-probability (the prompt token is not repeated among them). It is
    given complete or not at all (None): normally from the first output on; when the request's first
    sample was preempted mid-prompt, from a later output (always in the final one).

    ``error`` is set when the request failed while it was being generated (an exception in its own
    rows of a step): it is then finished, its unfinished samples with ``finish_reason="error"``; the
    other requests were not affected.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    error: Exception | None = None
