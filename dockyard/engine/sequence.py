"""A sequence: one sample of one request, with its tokens, KV blocks and stopping state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dockyard.engine.detokenizer import DetokenizerState
from dockyard.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from dockyard.structured_output.backend import GrammarMatcher

# Stands for a sampled token still on the device (async scheduling): the runner reads its value there.
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Token state of one generated sample; the scheduler updates its tokens, the engine its text."""

    seq_id: int
    request_id: str
    sample_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    max_total_len: int  # prompt + generated tokens never exceed this
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    # The request's prompt logprobs computed so far (entry 0 is None), when this sequence computes them
    # (the first sample of a request with prompt_logprobs set), else None. Entry i comes from the logits
    # of prompt row i - 1, so only the first len - 1 prompt tokens may be taken from the prefix cache.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    cumulative_logprob: float = 0.0
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the full blocks, in order
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    output_text: str = ""
    # Incremental detokenization offsets (engine/detokenizer.py), set by the engine on the first decode
    # (a fresh state from its detokenizer: full decoding for a tokenizer that needs it).
    detok: DetokenizerState | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    # Async scheduling (counted by scheduler.AsyncScheduler): tokens sampled by steps still in flight (not
    # yet in output_token_ids). They count in len(), so the scheduler runs the next step at once; the newest
    # is row ``pending_row`` of the in-flight step's sampled tokens, which the runner copies into the next
    # step's inputs on the device.
    num_pending: int = 0
    pending_row: int = -1
    # Structured outputs: this sample's position in its grammar (advanced by the engine with each token
    # it keeps); set when the request's grammar has compiled, before the sequence is scheduled.
    grammar: GrammarMatcher | None = None
    # Speculative decoding (engine/spec_decode.py): the proposer's guesses of the next tokens, fed with the
    # newest token in the next step and verified there; the draft distribution they were drawn from
    # ([len, V], None for deterministic proposals); runs of proposals verified, proposals and accepted ones.
    spec_token_ids: list[int] = field(default_factory=list)
    spec_probs: torch.Tensor | None = None
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """``token_ids[start:end]`` without building the whole list (the engine's per-step reads);
        positions of pending tokens read as ``PENDING_TOKEN``."""
        known = self.num_known_tokens
        if end > known:
            split = max(start, known)
            return (self.tokens(start, split) if split > start else []) + [PENDING_TOKEN] * (end - split)
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    def __len__(self) -> int:
        """Tokens including the pending ones: what the scheduler computes."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        """Prompt and output tokens whose values the host has (``len`` less the pending ones)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_cached_prefix(self) -> int | None:
        """How many leading tokens may come from the prefix cache (None: no limit)."""
        return None if self.prompt_logprobs is None else len(self.prompt_logprobs) - 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
