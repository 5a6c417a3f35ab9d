"""What the engine counts: tokens, requests, cache use, latencies (for logs, tests and /metrics)."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

MAX_OBSERVATIONS = 10_000  # latency samples kept for summaries; counters are never truncated


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

    def observe_ttft(self, seconds: float) -> None:
        self.time_to_first_token.append(seconds)
        self.ttft_count += 1
        self.ttft_sum += seconds

    def observe_itl(self, seconds: float) -> None:
        self.inter_token_latency.append(seconds)
        self.itl_count += 1
        self.itl_sum += seconds
