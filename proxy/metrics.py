"""Prometheus metrics with the names, types and labels of api.md (plus `endpoint` on the
tool metrics, below).

Each app gets its own `CollectorRegistry` (tests build many apps in one process). Every
label combination is created at zero up front, so dashboards and rate() see a series before
the first event. Tool-turn outcomes, call outcomes and repairs are observed from the same
parser events the encoders consume (`TurnObserver`).

Tool-turn and tool-call outcomes carry an `endpoint` label besides api.md's `outcome`
(issue 5: "metrics carry the endpoint label; the dashboard shows tool-turn success per
protocol"). Chat completions, Anthropic messages and Responses share one renderer and
parser, but each protocol's clients (Claude Code, Codex, chat agents) send different
histories and tool sets, so a regression in one shows up only per endpoint. The label is
bounded (TURN_ENDPOINTS); the overall success rate is the sum over it.

The dialect (dsml.md section 2) is a label of `build_info` only, never of a per-request
series (issue 6). A server that serves several dialects (per-model `models` in the
settings) exposes one `build_info` series per dialect it serves, the default dialect's
included, each at 1: "which replicas can render v3.2" is then
`dsml_proxy_build_info{dialect="v3.2"}`, and a server with one dialect keeps exactly one
series.

Engine metrics (`dsml_proxy_engine_*`, issue 17) exist only with the embedded backend: its
engine keeps plain-number counters (engine/ does not import prometheus) and `watch_engine`
registers a collector that reads them at each scrape. The names are a fixed table
(ENGINE_GAUGES, ENGINE_COUNTERS), all exported from the first scrape, no labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from dsml.events import (
    CallOutcome,
    Event,
    Notice,
    ParseResult,
    RepairKind,
    ToolCallEnd,
    TurnOutcome,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Bounded label values (proxy.middleware.ENDPOINT_BY_PATH maps routes to them). `messages`
# and `responses` are the Anthropic and Responses endpoints; `messages_count_tokens` is
# Anthropic's POST /v1/messages/count_tokens (no generation).
ENDPOINTS = (
    "chat_completions", "completions", "messages", "messages_count_tokens", "responses",
    "responses_store", "models", "health", "ready", "metrics", "other",
)
GENERATION_ENDPOINTS = ("chat_completions", "completions", "messages", "responses")
# The endpoints that run DSML turns (raw /v1/completions does not parse): the `endpoint`
# values of the tool-turn and tool-call counters.
TURN_ENDPOINTS = ("chat_completions", "messages", "responses")
STATUSES = ("200", "400", "401", "404", "405", "413", "422", "429", "500", "502", "503", "504",
            "529")  # 529: Anthropic's "overloaded" (/v1/messages when the limit is full)
TOKEN_KINDS = ("prompt", "completion", "reasoning")
UPSTREAM_REASONS = ("connect", "timeout", "status", "stream")

# Overhead is tens of microseconds per chunk: buckets from 50 us.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                    0.05, 0.1, 0.25, 0.5, 1.0)
# A thinking turn at max effort can run for many minutes: buckets to 30 minutes.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 120.0, 300.0, 600.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5,
               1.0, 2.5, 5.0)


# engine.runtime.Engine.stats() key -> (metric name after dsml_proxy_engine_, help)
ENGINE_GAUGES = {
    "queue_depth": ("queue_depth", "Sequences waiting for a slot or their prefill"),
    "running_sequences": ("running_sequences", "Sequences being decoded"),
    "slots_total": ("slots_total", "KV slots of the engine's pool"),
    "slots_used": ("slots_used", "KV slots pinned by a running sequence"),
    "slots_cached": ("slots_cached", "KV slots holding a finished sequence for reuse"),
    "prefix_cache_disk_bytes": ("prefix_cache_disk_bytes",
                                "Bytes of the prefix cache's disk tier (0: no disk tier)"),
    "last_decode_tokens_per_second": ("decode_tokens_per_second",
                                      "Tokens per second of the last decode step (all rows)"),
}
ENGINE_COUNTERS = {
    "requests": ("requests", "Sequences admitted to a prefill"),
    "prompt_tokens": ("prompt_tokens", "Prompt tokens of admitted sequences"),
    "prefill_tokens": ("prefill_tokens", "Prompt tokens run through the model (cache misses)"),
    "generated_tokens": ("generated_tokens", "Tokens sampled"),
    "decode_steps": ("decode_steps", "Batched decode steps"),
    "decode_seconds": ("decode_seconds", "Wall time of the decode steps"),
    "prefix_cache_hits": ("prefix_cache_hits", "Prompts that continued a cached sequence"),
    "prefix_cache_misses": ("prefix_cache_misses", "Prompts that found no cached prefix"),
    "prefix_cache_evictions": ("prefix_cache_evictions",
                               "Cached sequences evicted for a new one"),
    "prefix_cache_tokens_saved": ("prefix_cache_saved_tokens",
                                  "Prompt tokens not prefilled thanks to the prefix cache"),
    "prefix_cache_disk_hits": ("prefix_cache_disk_hits",
                               "Prompts that continued a conversation read back from disk"),
    "prefix_cache_disk_writes": ("prefix_cache_disk_writes", "Conversations written to disk"),
    "prefix_cache_disk_evictions": ("prefix_cache_disk_evictions",
                                    "Files deleted to keep the disk tier in its size limit"),
    "prefix_cache_disk_errors": ("prefix_cache_disk_errors",
                                 "Disk-tier files that failed to write or read (dropped)"),
}


class EngineCollector:
    """Reads the embedded engine's plain-number stats at each scrape (a custom collector)."""

    def __init__(self, stats: Callable[[], Mapping[str, float]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        values = self._stats()  # a handful of attribute reads: cheap on the event loop
        p = "dsml_proxy_engine_"
        for key, (name, doc) in ENGINE_GAUGES.items():
            yield GaugeMetricFamily(p + name, doc, value=float(values.get(key, 0)))
        for key, (name, doc) in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(p + name, doc, value=float(values.get(key, 0)))

    def describe(self) -> Iterator[Metric]:  # names only: registering does not call stats()
        for name, doc in ENGINE_GAUGES.values():
            yield GaugeMetricFamily("dsml_proxy_engine_" + name, doc)
        for name, doc in ENGINE_COUNTERS.values():
            yield CounterMetricFamily("dsml_proxy_engine_" + name, doc)


class Children(dict):  # type: ignore[type-arg]
    """Label values -> the labelled child of one metric, looked up once per combination.

    `metric.labels(...)` takes a lock and checks and joins the values on every call (a few
    us, several times per request); the label values here are bounded and children are never
    removed, so the child is kept. Key: the one label value, or a tuple of them."""

    __slots__ = ("_labels",)

    def __init__(self, metric: Any) -> None:
        super().__init__()
        self._labels = metric.labels

    def __missing__(self, key: Any) -> Any:
        child = self._labels(*key) if isinstance(key, tuple) else self._labels(key)
        self[key] = child
        return child


class Metrics:
    def __init__(self, *, version: str, dialect: str | Sequence[str], backend: str) -> None:
        """`dialect`: the served dialect, or every served one (one build_info series each)."""
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "dsml_proxy_"
        self.requests = Counter(p + "requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.inflight = Gauge(p + "inflight_requests", "Requests being served",
                              ["endpoint"], registry=r)
        self.duration = Histogram(p + "request_duration_seconds", "Whole request duration",
                                  ["endpoint", "stream"], buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds",
                              "Request start to the first generated token", ["endpoint"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds",
                             "Time between two deltas from the backend, per token",
                             buckets=ITL_BUCKETS, registry=r)
        self.overhead = Histogram(p + "overhead_seconds",
                                  "Time spent in this process per request (backend waits excluded)",
                                  ["endpoint"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.tokens = Counter(p + "tokens", "Tokens by kind", ["kind"], registry=r)
        self.upstream_errors = Counter(p + "upstream_errors", "Backend failures by reason",
                                       ["reason"], registry=r)
        self.tool_turns = Counter(p + "tool_turns",
                                  "Turns that offered tools, by endpoint and outcome",
                                  ["endpoint", "outcome"], registry=r)
        self.tool_calls = Counter(p + "tool_calls",
                                  "Tool calls by endpoint and validation outcome",
                                  ["endpoint", "outcome"], registry=r)
        # Constrained decoding (issue 16): the same outcomes, apart for turns that ran under a
        # grammar ("true") and those that did not ("false").
        self.constrained_turns = Counter(
            p + "constrained_tool_turns", "Turns that offered tools, by whether a grammar "
            "constrained them and outcome", ["constrained", "outcome"], registry=r)
        self.constrained_calls = Counter(
            p + "constrained_tool_calls", "Tool calls by whether a grammar constrained their "
            "turn and validation outcome", ["constrained", "outcome"], registry=r)
        self.repairs = Counter(p + "dsml_repairs", "DSML tolerances applied, by kind",
                               ["kind"], registry=r)
        self.build_info = Gauge(p + "build_info", "Build and configuration",
                                ["version", "dialect", "backend"], registry=r)
        for name in [dialect] if isinstance(dialect, str) else dialect:
            self.build_info.labels(version, str(name), backend).set(1)

        for endpoint in ENDPOINTS:
            self.inflight.labels(endpoint)
            for status in STATUSES:
                self.requests.labels(endpoint, status)
            for stream in ("true", "false"):
                self.duration.labels(endpoint, stream)
            self.overhead.labels(endpoint)
            self.ttft.labels(endpoint)
        for kind in TOKEN_KINDS:
            self.tokens.labels(kind)
        for reason in UPSTREAM_REASONS:
            self.upstream_errors.labels(reason)
        for endpoint in TURN_ENDPOINTS:
            for outcome in TurnOutcome:
                self.tool_turns.labels(endpoint, outcome.value)
            for outcome in CallOutcome:
                self.tool_calls.labels(endpoint, outcome.value)
        for kind in RepairKind:
            self.repairs.labels(kind.value)
        for constrained in ("true", "false"):
            for outcome in TurnOutcome:
                self.constrained_turns.labels(constrained, outcome.value)
            for outcome in CallOutcome:
                self.constrained_calls.labels(constrained, outcome.value)
        # The same children, looked up once (Children): what the request path uses.
        self.requests_of = Children(self.requests)
        self.inflight_of = Children(self.inflight)
        self.duration_of = Children(self.duration)
        self.ttft_of = Children(self.ttft)
        self.overhead_of = Children(self.overhead)
        self.tokens_of = Children(self.tokens)
        self.tool_turns_of = Children(self.tool_turns)
        self.constrained_turns_of = Children(self.constrained_turns)
        self.constrained_calls_of = Children(self.constrained_calls)
        self.tool_calls_of = Children(self.tool_calls)
        self.repairs_of = Children(self.repairs)

    def watch_engine(self, stats: Callable[[], Mapping[str, float]]) -> None:
        """Export an embedded engine's stats (engine.runtime.Engine.stats) as dsml_proxy_engine_*."""
        self.registry.register(EngineCollector(stats))

    def scrape(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """A registry's view without the `_created` samples of counters and histograms.

    They double the exposition (one per labelled child, and every combination here exists
    from the start) and no dashboard or alert uses them. prometheus-client's switch,
    `disable_created_metrics()`, is process-wide (a module global read at each collection),
    so calling it would change the exposition of every other registry in the process, e.g.
    an application embedding this one; dropping them from our own scrape touches nothing else.
    """

    __slots__ = ("_registry",)

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():  # fresh Metric objects on every collection
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class TurnObserver:
    """Feeds one turn's parser events into the metrics (no per-event allocation)."""

    __slots__ = ("_endpoint", "_metrics", "constrained")

    def __init__(self, metrics: Metrics, endpoint: str) -> None:
        self._metrics = metrics
        self._endpoint = endpoint
        self.constrained = "false"  # "true" once a generation of the turn ran under a grammar

    def on_event(self, event: Event) -> None:
        if isinstance(event, ToolCallEnd):
            self._metrics.tool_calls_of[self._endpoint, event.outcome.value].inc()
            self._metrics.constrained_calls_of[self.constrained, event.outcome.value].inc()
        elif isinstance(event, Notice):
            self._metrics.repairs_of[event.kind.value].inc()

    def on_turn(self, result: ParseResult, *, prompt_tokens: int, completion_tokens: int,
                reasoning_tokens: int) -> None:
        m = self._metrics
        m.tokens_of["prompt"].inc(prompt_tokens)
        m.tokens_of["completion"].inc(completion_tokens)
        m.tokens_of["reasoning"].inc(reasoning_tokens)
        if result.turn_outcome is not None:
            m.tool_turns_of[self._endpoint, result.turn_outcome.value].inc()
            m.constrained_turns_of[self.constrained, result.turn_outcome.value].inc()
