"""What the engine counts: tokens, requests, cache use, latencies (for logs, tests and /metrics).

Request-level observations follow vLLM's metric set: one per request (a request with ``n=2`` counts
once), made when it finishes (:meth:`EngineMetrics.observe_request`): its finish reason, prompt and
generated tokens, its ``n`` and ``max_tokens``, and its phases: queued (arrival → first scheduled),
prefill (first scheduled → first token), decode (first token → last token), inference (first
scheduled → last token) and end to end (arrival → finished).
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from dataclasses import dataclass, field

MAX_OBSERVATIONS = 10_000  # latency samples kept for summaries; counters are never truncated

# Upper bounds (seconds) of the latency histograms exported on /metrics; one more bucket is +Inf.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 10.0, 20.0, 40.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
# Request phases (queue, prefill, decode, inference, end to end) share vLLM's request-latency buckets.
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)
# Token counts per request: 1, 2, 5, 10, 20, 50, ... (vLLM's 1-2-5 series).
TOKEN_COUNT_BUCKETS = tuple(m * 10**e for e in range(8) for m in (1, 2, 5))
REQUEST_PHASES = ("queue", "prefill", "decode", "inference", "e2e")


@dataclass
class Histogram:
    """Cumulative-over-all-time bucket counts (Prometheus semantics: ``le`` upper bounds)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative); last = above every bound
    count: int = 0
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` pairs, ending with ``(inf, count)``."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            running += n
            out.append((bound, running))
        return out


@dataclass
class SpecDecodeMetrics:
    """Speculative decoding's counters (vLLM's ``spec_decode_*``): verified proposal runs (drafts), their
    tokens, the accepted ones, and accepted ones by position in their run."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        """One sequence's verified proposals: ``num_draft_tokens`` of them, the first ``num_accepted`` accepted."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_draft_tokens:
            self.accepted_per_pos.extend([0] * (num_draft_tokens - len(self.accepted_per_pos)))
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted proposals over proposals (0 when none was made)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verified run: the accepted proposals plus the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass
class EngineMetrics:
    """Cumulative counters plus recent latency observations (seconds)."""

    prompt_tokens_computed: int = 0  # prompt tokens actually run through the model (cache hits excluded)
    generation_tokens: int = 0
    steps: int = 0
    requests_added: int = 0
    prompt_tokens: int = 0  # prompt tokens of the requests taken (prefix-cache hits included)
    requests_finished: Counter[str] = field(default_factory=Counter)  # requests by finish reason (stop/length/abort)
    time_to_first_token: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    inter_token_latency: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    # Totals of every observation (also past the window), for Prometheus-style sums.
    ttft_count: int = 0
    ttft_sum: float = 0.0
    itl_count: int = 0
    itl_sum: float = 0.0
    ttft_histogram: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl_histogram: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    iteration_tokens: Histogram = field(default_factory=lambda: Histogram(ITERATION_TOKEN_BUCKETS))
    request_prompt_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_COUNT_BUCKETS))
    request_generation_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_COUNT_BUCKETS))
    request_max_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_COUNT_BUCKETS))
    request_n: Histogram = field(default_factory=lambda: Histogram(N_BUCKETS))
    request_time_per_output_token: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    request_phases: dict[str, Histogram] = field(
        default_factory=lambda: {phase: Histogram(REQUEST_LATENCY_BUCKETS) for phase in REQUEST_PHASES})
    spec_decode: SpecDecodeMetrics = field(default_factory=SpecDecodeMetrics)

    def observe_ttft(self, seconds: float) -> None:
        self.time_to_first_token.append(seconds)
        self.ttft_count += 1
        self.ttft_sum += seconds
        self.ttft_histogram.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.inter_token_latency.append(seconds)
        self.itl_count += 1
        self.itl_sum += seconds
        self.itl_histogram.observe(seconds)

    def observe_request(self, reason: str, samples: list[RequestTiming], num_prompt_tokens: int, n: int,
                        max_tokens: int | None, now: float) -> None:
        """One finished request (every sample done): its reason and its phases (see the module docstring)."""
        self.requests_finished[reason] += 1
        generated = sum(s.num_generated for s in samples)
        self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(generated)
        self.request_n.observe(n)
        if max_tokens is not None:
            self.request_max_tokens.observe(max_tokens)
        arrival = min(s.arrival for s in samples)
        self.request_phases["e2e"].observe(now - arrival)
        scheduled = [s.first_scheduled for s in samples if s.first_scheduled is not None]
        first = [s.first_token for s in samples if s.first_token is not None]
        last = [s.last_token for s in samples if s.last_token is not None]
        if scheduled:
            self.request_phases["queue"].observe(min(scheduled) - arrival)
        if scheduled and first:
            self.request_phases["prefill"].observe(min(first) - min(scheduled))
            self.request_phases["inference"].observe(max(last) - min(scheduled))
            self.request_phases["decode"].observe(max(last) - min(first))
            if generated > len(first):
                self.request_time_per_output_token.observe((max(last) - min(first)) / (generated - len(first)))


@dataclass(frozen=True)
class RequestTiming:
    """When one sample of a request arrived, was first scheduled and got its first and last tokens."""

    arrival: float
    first_scheduled: float | None
    first_token: float | None
    last_token: float | None
    num_generated: int
