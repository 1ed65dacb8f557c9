"""Prometheus metrics with LoRAX's names, plus what operators of a multi-LoRA server ask for.

LoRAX's counters keep their exact names (`lorax_request_count`, not prometheus_client's
`lorax_request_count_total`), so dashboards built for LoRAX work: they are rendered here. Histograms
and gauges come from prometheus_client, in a registry of this server's own. Gauges are read from the
router at scrape time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router_client.messages import RouterLoad, StepRecord

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
COUNTERS = {
    "lorax_request_count": "Requests received",
    "lorax_request_success": "Requests that generated successfully",
    "lorax_request_failure": "Requests that failed, by error type",
    "lorax_adapter_request_count": 'Requests received, by adapter ("" is the base model)',
}


@dataclass(frozen=True)
class RequestTiming:
    """perf_counter() instants of one finished sequence, and its sizes."""

    received: float  # the HTTP request arrived
    submitted: float  # handed to the router (validation done)
    admitted: float  # the router sent its Prefill
    first_token: float
    finished: float
    input_tokens: int
    generated_tokens: int
    skipped_tokens: int = 0  # speculative decoding: tokens accepted beyond the first of a step


class _Counters:
    """Counters rendered under their exact names."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def inc(self, name: str, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + 1

    def render(self) -> str:
        with self._lock:
            values = dict(self._values)
        lines = []
        for name, doc in COUNTERS.items():
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} counter"]
            samples = sorted((labels, v) for (n, labels), v in values.items() if n == name)
            for labels, value in samples or (
                [((), 0.0)] if name in ("lorax_request_count", "lorax_request_success") else []
            ):
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines.append(f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _LoadCollector(Collector):
    def __init__(self, load: Callable[[], RouterLoad], adapters_loading: Callable[[], int]) -> None:
        self._load = load
        self._loading = adapters_loading

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        load = self._load()
        for name, doc, value in (
            ("lorax_batch_current_size", "Requests in the running batch", load.batch_size),
            ("lorax_batch_current_max_tokens", "KV token slots the running batch holds", load.batch_max_tokens),
            ("lorax_queue_length", "Requests waiting for admission", load.queued),
            ("lorax_requests_in_flight", "Requests admitted and not finished", load.in_flight),
            ("lorax_kv_blocks_used", "KV cache blocks held by requests", load.blocks_used),
            ("lorax_kv_blocks_free", "KV cache blocks free", load.blocks_free),
            ("lorax_adapters_loaded", "Adapters resident on the shards", load.adapters_loaded),
            ("lorax_adapters_loading", "Adapter loads under way", self._loading()),
            ("lorax_adapters_offloaded", "Adapters known but offloaded", load.adapters_offloaded),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        cached = load.prefix_cached_blocks
        yield GaugeMetricFamily("lorax_prefix_cache_blocks", "KV blocks the prefix cache holds", cached)
        rate = load.prefix_hit_tokens / load.prefix_lookup_tokens if load.prefix_lookup_tokens else 0.0
        yield GaugeMetricFamily("lorax_prefix_cache_hit_rate", "Prompt tokens reused / prompt tokens looked up", rate)
        for name, doc, count in (
            ("lorax_prefix_cache_lookups", "Admitted requests that looked the prefix cache up", load.prefix_lookups),
            ("lorax_prefix_cache_hits", "Lookups that reused at least one cached block", load.prefix_hits),
            ("lorax_prefix_cache_lookup_tokens", "Prompt tokens of the lookups", load.prefix_lookup_tokens),
            ("lorax_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", load.prefix_hit_tokens),
        ):
            yield CounterMetricFamily(name, doc, value=count)
        yield from _speculation(load)


def _speculation(load: RouterLoad) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Drafts per step and accepted tokens per Decode row (a request in one step after its first token):
    the mean is 1.0 without speculation; rate(tokens) / rate(rows) gives it over a window."""
    yield GaugeMetricFamily("lorax_speculative_tokens", "Draft tokens the shards verify per step", load.speculate)
    per_step = load.decode_tokens / load.decode_rows if load.decode_rows else 0.0
    yield GaugeMetricFamily(
        "lorax_decode_accepted_tokens_per_step", "Mean tokens a request gains per Decode step since start", per_step
    )
    yield CounterMetricFamily("lorax_decode_rows", "Decode rows: one request in one step", value=load.decode_rows)
    yield CounterMetricFamily("lorax_decode_tokens", "Tokens the Decode rows accepted", value=load.decode_tokens)


class Metrics:
    """Every metric of one front. Thread-safe: the router's loop thread reports steps."""

    def __init__(self, load: Callable[[], RouterLoad], adapters_loading: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self._counters = _Counters()

        def hist(name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, labels, registry=self.registry, buckets=buckets)

        self.duration = hist("lorax_request_duration", "Request latency, arrival to last token (s)", SECONDS)
        self.queue_duration = hist("lorax_request_queue_duration", "Time waiting for admission (s)", SECONDS)
        self.validation_duration = hist("lorax_request_validation_duration", "Parsing and validation (s)", SECONDS)
        self.inference_duration = hist("lorax_request_inference_duration", "Admission to last token (s)", SECONDS)
        self.time_per_token = hist("lorax_request_mean_time_per_token_duration", "Inference time / tokens (s)", SECONDS)
        self.ttft = hist("lorax_request_time_to_first_token_duration", "Arrival to first token (s)", SECONDS)
        self.generated_tokens = hist("lorax_request_generated_tokens", "Generated tokens per request", TOKENS)
        self.input_length = hist("lorax_request_input_length", "Prompt tokens per request", TOKENS)
        self.skipped_tokens = hist("lorax_request_skipped_tokens", "Skipped tokens per request", TOKENS)
        self.batch_inference = hist(
            "lorax_batch_inference_duration", "One Prefill or Decode on the shards (s)", SECONDS, ("method",)
        )
        self.registry.register(_LoadCollector(load, adapters_loading))

    def request_received(self) -> None:
        self._counters.inc("lorax_request_count")

    def adapter_used(self, adapter: str) -> None:
        """A request was served by `adapter` (counted only once the adapter is known to exist)."""
        self._counters.inc("lorax_adapter_request_count", adapter=adapter)

    def request_failed(self, error_type: str) -> None:
        self._counters.inc("lorax_request_failure", err=error_type)

    def request_succeeded(self, t: RequestTiming) -> None:
        self._counters.inc("lorax_request_success")
        self.duration.observe(t.finished - t.received)
        self.validation_duration.observe(t.submitted - t.received)
        self.queue_duration.observe(t.admitted - t.submitted)
        self.inference_duration.observe(t.finished - t.admitted)
        self.ttft.observe(t.first_token - t.received)
        if t.generated_tokens:
            self.time_per_token.observe((t.finished - t.admitted) / t.generated_tokens)
        self.generated_tokens.observe(t.generated_tokens)
        self.input_length.observe(t.input_tokens)
        self.skipped_tokens.observe(t.skipped_tokens)

    def observe_step(self, step: StepRecord) -> None:
        self.batch_inference.labels(method=step.method).observe(step.duration_s)

    def render(self) -> bytes:
        return generate_latest(self.registry) + self._counters.render().encode()
