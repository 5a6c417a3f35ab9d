"""``GET /metrics``: vLLM's Prometheus metric set, by ``prometheus_client``, under a chosen prefix.

The names after the prefix are vLLM v1's (``num_requests_running``, ``kv_cache_usage_perc``,
``prefix_cache_queries_total``, ``request_success_total{finished_reason}``, ``time_to_first_token_seconds``,
``request_queue_time_seconds``, ``iteration_tokens_total``, ...), with its ``model_name`` and ``engine``
labels, so ``--metrics-prefix vllm`` gives vLLM's own names (``vllm:...``) to its Grafana dashboards,
autoscalers and routers; the default prefix is ``dockyard``. Requests are counted as requests: one
with ``n=2`` is one running request and one success. A few names are dockyard's own (KV blocks
used/free/total, engine steps, HTTP requests by endpoint, prompt tokens actually computed).

Each server has its own :class:`CollectorRegistry`: a collector that reads the engine's counters
(:class:`~dockyard.engine.metrics.EngineMetrics`, the one place they are kept) when scraped, plus
``prometheus_client``'s process, platform and garbage-collector metrics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from dockyard.engine.llm_engine import LLMEngine
from dockyard.engine.metrics import Histogram, SpecDecodeMetrics

FINISH_REASONS = ("stop", "length", "abort", "error")
DEFAULT_PREFIX = "dockyard"
LABELS = ("model_name", "engine")
# name after the prefix -> (what it measures, the EngineMetrics histogram it reads)
_HISTOGRAMS = {
    "time_to_first_token_seconds": ("Histogram of time to first token in seconds.", "ttft_histogram"),
    "inter_token_latency_seconds": ("Histogram of inter-token latency in seconds.", "itl_histogram"),
    "request_time_per_output_token_seconds": ("Histogram of time_per_output_token_seconds per request.",
                                              "request_time_per_output_token"),
    "iteration_tokens_total": ("Histogram of number of tokens per engine_step.", "iteration_tokens"),
    "request_prompt_tokens": ("Number of prefill tokens processed.", "request_prompt_tokens"),
    "request_generation_tokens": ("Number of generation tokens processed.", "request_generation_tokens"),
    "request_params_n": ("Histogram of the n request parameter.", "request_n"),
    "request_params_max_tokens": ("Histogram of the max_tokens request parameter.", "request_max_tokens"),
}
_PHASES = {
    "e2e_request_latency_seconds": ("Histogram of e2e request latency in seconds.", "e2e"),
    "request_queue_time_seconds": ("Histogram of time spent in WAITING phase for request.", "queue"),
    "request_prefill_time_seconds": ("Histogram of time spent in PREFILL phase for request.", "prefill"),
    "request_decode_time_seconds": ("Histogram of time spent in DECODE phase for request.", "decode"),
    "request_inference_time_seconds": ("Histogram of time spent in RUNNING phase for request.", "inference"),
}


@dataclass
class ServerStats:
    """What the HTTP layer counts beside the engine."""

    requests_received: Counter[str] = field(default_factory=Counter)  # by endpoint


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


class EngineCollector(Collector):
    """The engine's and the server's counters as Prometheus metric families, read at scrape time."""

    def __init__(self, engine: LLMEngine, server: ServerStats, model_name: str, prefix: str) -> None:
        self.engine = engine
        self.server = server
        self.values = [model_name, "0"]
        self.prefix = prefix + ":"

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(self.prefix + name, doc, labels=LABELS)
        g.add_metric(self.values, value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(self.prefix + name, doc, labels=LABELS)
        c.add_metric(self.values, value)
        return c

    def _histogram(self, name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
        h = HistogramMetricFamily(self.prefix + name, doc, labels=LABELS)
        h.add_metric(self.values, [(_bound(b), n) for b, n in hist.cumulative()], sum_value=hist.sum)
        return h

    def collect(self) -> Iterator[Metric]:
        stats, m = self.engine.stats(), self.engine.metrics
        yield self._gauge("num_requests_running", "Number of requests in model execution batches.",
                          stats["num_requests_running"])
        yield self._gauge("num_requests_waiting", "Number of requests waiting to be processed.",
                          stats["num_requests_waiting"])
        yield self._gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", stats["kv_cache_usage"])
        yield self._counter("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                            stats["prefix_cache_queries"])
        yield self._counter("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                            stats["prefix_cache_hits"])
        yield self._counter("num_preemptions", "Cumulative number of preemption from the engine.",
                            stats["num_preemptions"])
        yield self._counter("prompt_tokens", "Number of prefill tokens processed.", m.prompt_tokens)
        yield self._counter("generation_tokens", "Number of generation tokens processed.", stats["generation_tokens"])
        success = CounterMetricFamily(self.prefix + "request_success", "Count of successfully processed requests.",
                                      labels=(*LABELS, "finished_reason"))
        for reason in FINISH_REASONS:
            success.add_metric([*self.values, reason], m.requests_finished.get(reason, 0))
        yield success
        for name, (doc, attr) in _HISTOGRAMS.items():
            yield self._histogram(name, doc, getattr(m, attr))
        for name, (doc, phase) in _PHASES.items():
            yield self._histogram(name, doc, m.request_phases[phase])
        info = GaugeMetricFamily(self.prefix + "cache_config_info", "Information of the LLMEngine CacheConfig.",
                                 labels=("block_size", "num_gpu_blocks", "enable_prefix_caching"))
        cfg = self.engine.config
        info.add_metric([str(cfg.block_size), str(stats["kv_blocks_total"]), str(cfg.enable_prefix_caching)], 1)
        yield info
        # dockyard's own
        yield self._gauge("kv_cache_blocks_used", "KV-cache blocks held by requests.", stats["kv_blocks_used"])
        yield self._gauge("kv_cache_blocks_free", "KV-cache blocks free (possibly holding reusable prefix-cache "
                                                  "content).", stats["kv_blocks_free"])
        yield self._gauge("kv_cache_blocks_total", "KV-cache blocks in the pool.", stats["kv_blocks_total"])
        yield self._counter("prompt_tokens_computed", "Prompt tokens run through the model (prefix-cache hits "
                                                      "excluded).", stats["prompt_tokens_computed"])
        yield self._counter("engine_steps", "Engine steps run.", stats["steps"])
        received = CounterMetricFamily(self.prefix + "http_requests_received", "Generation requests received, by "
                                       "endpoint.", labels=(*LABELS, "endpoint"))
        for endpoint, n in sorted(self.server.requests_received.items()):
            received.add_metric([*self.values, endpoint], n)
        yield received
        if self.engine.speculative_config is not None:
            yield from self._spec_decode(m.spec_decode)

    def _spec_decode(self, spec: SpecDecodeMetrics) -> Iterator[Metric]:
        """vLLM's speculative-decoding counters (exported only when the engine speculates)."""
        yield self._counter("spec_decode_num_drafts", "Number of spec decoding drafts.", spec.num_drafts)
        yield self._counter("spec_decode_num_draft_tokens", "Number of draft tokens.", spec.num_draft_tokens)
        yield self._counter("spec_decode_num_accepted_tokens", "Number of accepted tokens.",
                            spec.num_accepted_tokens)
        per_pos = CounterMetricFamily(self.prefix + "spec_decode_num_accepted_tokens_per_pos",
                                      "Accepted tokens per draft position.", labels=(*LABELS, "position"))
        for pos, n in enumerate(spec.accepted_per_pos):
            per_pos.add_metric([*self.values, str(pos)], n)
        yield per_pos


def make_registry(engine: LLMEngine, server: ServerStats, model_name: str,
                  prefix: str = DEFAULT_PREFIX) -> CollectorRegistry:
    """A registry of its own for one server: the engine collector plus process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, server, model_name, prefix))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The whole ``/metrics`` page in Prometheus' text format."""
    return generate_latest(registry)
