"""What the engine counts: tokens, requests, cache use, latencies (for logs, tests and /metrics)."""

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
class EngineMetrics:
    """Cumulative counters plus recent latency observations (seconds)."""

    prompt_tokens_computed: int = 0  # prompt tokens actually run through the model (cache hits excluded)
    generation_tokens: int = 0
    steps: int = 0
    requests_added: int = 0
    requests_finished: Counter[str] = field(default_factory=Counter)  # by finish reason (stop/length/abort)
    time_to_first_token: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    inter_token_latency: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_OBSERVATIONS))
    # Totals of every observation (also past the window), for Prometheus-style sums.
    ttft_count: int = 0
    ttft_sum: float = 0.0
    itl_count: int = 0
    itl_sum: float = 0.0
    ttft_histogram: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl_histogram: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))

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
