"""``GET /metrics``: the engine's and the server's counters in Prometheus text format.

Names are prefixed ``dockyard:`` the way vLLM prefixes ``vllm:``, and mostly match vLLM's, so
dashboards port by changing the prefix. Request counters count *samples*: a request with ``n=2``
finishes two. Written by hand (the format is a few lines of text) to need no extra package.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from dockyard.engine.llm_engine import LLMEngine
from dockyard.engine.metrics import E2E_BUCKETS, Histogram

FINISH_REASONS = ("stop", "length", "abort", "error")
PREFIX = "dockyard:"


@dataclass
class ServerStats:
    """What the HTTP layer counts beside the engine."""

    prompt_tokens: int = 0  # prompt tokens of every accepted request (cache hits included)
    requests_received: Counter[str] = field(default_factory=Counter)  # by endpoint
    e2e_latency: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Writer:
    def __init__(self, model_name: str) -> None:
        self.base = {"model_name": model_name}
        self.lines: list[str] = []

    def _labels(self, extra: dict[str, str] | None = None) -> str:
        labels = {**self.base, **(extra or {})}
        return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"

    def metric(self, name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str] | None, float]]) -> None:
        full = PREFIX + name
        self.lines.append(f"# HELP {full} {help_text}")
        self.lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            self.lines.append(f"{full}{self._labels(labels)} {_number(value)}")

    def gauge(self, name: str, help_text: str, value: float) -> None:
        self.metric(name, "gauge", help_text, [(None, value)])

    def counter(self, name: str, help_text: str, value: float) -> None:
        self.metric(name, "counter", help_text, [(None, value)])

    def histogram(self, name: str, help_text: str, hist: Histogram) -> None:
        full = PREFIX + name
        self.lines.append(f"# HELP {full} {help_text}")
        self.lines.append(f"# TYPE {full} histogram")
        for bound, count in hist.cumulative():
            self.lines.append(f"{full}_bucket{self._labels({'le': _number(bound)})} {count}")
        self.lines.append(f"{full}_sum{self._labels()} {_number(hist.sum)}")
        self.lines.append(f"{full}_count{self._labels()} {hist.count}")


def render_metrics(engine: LLMEngine, server: ServerStats, model_name: str) -> str:
    """The whole ``/metrics`` page."""
    stats, m = engine.stats(), engine.metrics
    w = _Writer(model_name)
    w.gauge("num_requests_running", "Sequences in the running batch.", stats["num_requests_running"])
    w.gauge("num_requests_waiting", "Sequences waiting to be scheduled.", stats["num_requests_waiting"])
    w.gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", stats["kv_cache_usage"])
    w.gauge("kv_cache_blocks_used", "KV-cache blocks held by sequences.", stats["kv_blocks_used"])
    w.gauge("kv_cache_blocks_free", "KV-cache blocks free (possibly holding reusable prefix-cache content).",
            stats["kv_blocks_free"])
    w.gauge("kv_cache_blocks_total", "KV-cache blocks in the pool.", stats["kv_blocks_total"])
    w.counter("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
              stats["prefix_cache_queries"])
    w.counter("prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", stats["prefix_cache_hits"])
    w.gauge("prefix_cache_hit_rate", "Prefix-cache hits / queries since start (0 to 1).",
            stats["prefix_cache_hit_rate"])
    w.counter("prompt_tokens_total", "Prompt tokens of accepted requests.", server.prompt_tokens)
    w.counter("prompt_tokens_computed_total", "Prompt tokens run through the model (prefix-cache hits excluded).",
              stats["prompt_tokens_computed"])
    w.counter("generation_tokens_total", "Generated tokens.", stats["generation_tokens"])
    w.counter("num_preemptions_total", "Sequences preempted for lack of KV blocks (recomputed later).",
              stats["num_preemptions"])
    w.counter("engine_steps_total", "Engine steps run.", stats["steps"])
    w.metric("request_success_total", "counter", "Finished samples by finish reason (abort: client gone or shutdown).",
             [({"finished_reason": r}, m.requests_finished.get(r, 0)) for r in FINISH_REASONS])
    w.counter("num_requests_aborted_total", "Samples aborted before they finished.",
              m.requests_finished.get("abort", 0))
    w.metric("http_requests_received_total", "counter", "Generation requests received, by endpoint.",
             [({"endpoint": ep}, n) for ep, n in sorted(server.requests_received.items())])
    w.histogram("time_to_first_token_seconds", "Time from arrival to the first generated token.", m.ttft_histogram)
    w.histogram("inter_token_latency_seconds", "Time between consecutive generated tokens of a sample.",
                m.itl_histogram)
    w.histogram("e2e_request_latency_seconds", "Time from the HTTP request to its last token.", server.e2e_latency)
    return "\n".join(w.lines) + "\n"
