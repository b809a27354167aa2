"""Prometheus instruments of the server, created against an injected registry so that tests can
build many apps in one process. Labels are bounded: `model` is always a resolved served name
(base name or adapter identity), never a string the client made up; unknown models count as
"unknown".
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter(
            "loraplex_requests_total",
            "Finished inference requests.",
            ["model", "endpoint", "status"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "loraplex_requests_in_flight", "Inference requests being served.", registry=registry
        )
        self.latency = Histogram(
            "loraplex_request_duration_seconds",
            "End-to-end latency of successful requests.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens_total", "Prompt tokens processed.", ["model"], registry=registry
        )
        self.generation_tokens = Counter(
            "loraplex_generation_tokens_total",
            "Tokens generated.",
            ["model"],
            registry=registry,
        )
        self.adapter_loads = Counter(
            "loraplex_adapter_loads_total",
            "Adapter loads into the engine.",
            ["adapter", "status"],
            registry=registry,
        )
        self.adapter_load_seconds = Histogram(
            "loraplex_adapter_load_seconds",
            "Time to load an adapter into the engine.",
            ["adapter"],
            registry=registry,
        )
        self.adapter_cache = Counter(
            "loraplex_adapter_cache_lookups_total",
            "Adapter artifact lookups in the local disk cache.",
            ["adapter", "result"],  # result: hit | miss
            registry=registry,
        )
        self.adapter_cache_evictions = Counter(
            "loraplex_adapter_cache_evictions_total",
            "Adapter artifacts evicted from the local disk cache.",
            registry=registry,
        )
        self.adapter_cache_bytes = Gauge(
            "loraplex_adapter_cache_bytes",
            "Bytes of adapter artifacts in the local disk cache.",
            registry=registry,
        )
        self.adapters_loaded = Gauge(
            "loraplex_adapters_loaded",
            "Adapters loaded in the engine (registry versions and local folders).",
            registry=registry,
        )
        self.adapter_leases = Gauge(
            "loraplex_adapter_leases",
            "Requests holding a registry adapter version (a held version is never unloaded).",
            registry=registry,
        )
        self.adapter_warmup_failures = Counter(
            "loraplex_adapter_warmup_failures_total",
            "Versions an alias moved to that could not be loaded before routing; the alias "
            "keeps its previous target on this replica until a retry succeeds.",
            ["adapter"],
            registry=registry,
        )
        self.registry_revision = Gauge(
            "loraplex_registry_revision",
            "Registry revision the routing table reflects.",
            registry=registry,
        )
        self.registry_poll_errors = Counter(
            "loraplex_registry_poll_errors_total",
            "Failed reads of the registry's routing table.",
            registry=registry,
        )
        self.engine_ready = Gauge(
            "loraplex_engine_ready", "1 when the engine can serve.", registry=registry
        )
        self._init_ab(registry)

    def _init_ab(self, registry: CollectorRegistry) -> None:
        """A/B experiments; labels bounded by one running experiment per adapter name."""
        labels = ["adapter", "version", "experiment", "variant"]
        self.ab_requests = Counter(
            "loraplex_ab_requests_total", "Requests served inside an experiment.", labels,
            registry=registry,
        )  # fmt: skip
        self.ab_errors = Counter(
            "loraplex_ab_errors_total", "Requests inside an experiment that failed (5xx).",
            labels, registry=registry,
        )  # fmt: skip
        self.ab_unanalysed = Counter(
            "loraplex_ab_unanalysed_requests_total",
            "Requests inside an experiment left out of its analysis: reason unkeyed (no user "
            "key) or outside-slice (served the control outside the analysed 1:1 slice).",
            [*labels, "reason"], registry=registry,
        )  # fmt: skip
        self.ab_latency = Histogram(
            "loraplex_ab_request_duration_seconds", "End-to-end latency inside an experiment.",
            labels, buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ab_ttft = Histogram(
            "loraplex_ab_time_to_first_token_seconds", "Time to first token inside an experiment.",
            labels, buckets=_TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ab_output_tokens = Counter(
            "loraplex_ab_output_tokens_total", "Tokens generated inside an experiment.", labels,
            registry=registry,
        )  # fmt: skip
        self.ab_feedback = Counter(
            "loraplex_ab_feedback_total", "Feedback scores received (first rating per completion).",
            labels, registry=registry,
        )  # fmt: skip
        self.ab_feedback_score = Counter(
            "loraplex_ab_feedback_score_sum", "Sum of the feedback scores received.", labels,
            registry=registry,
        )  # fmt: skip
        self.ab_users = Gauge(
            "loraplex_ab_users", "Users exposed in the analysed slice (all replicas; as of the "
            "last analysis pass).", labels, registry=registry,
        )  # fmt: skip
        self.ab_records = Counter(
            "loraplex_ab_recorded_requests_total",
            "Experiment requests written to the registry database.", registry=registry,
        )  # fmt: skip
        self.ab_flush_errors = Counter(
            "loraplex_ab_flush_errors_total",
            "Failed writes of experiment data (kept and retried).", registry=registry,
        )  # fmt: skip
        self.ab_records_dropped = Counter(
            "loraplex_ab_records_dropped_total",
            "Completion ids dropped from a full buffer during a long database outage.",
            registry=registry,
        )  # fmt: skip
        self.ab_decisions = Counter(
            "loraplex_ab_actions_total", "Actions taken by this replica's analysis passes.",
            ["adapter", "experiment", "action"], registry=registry,
        )  # fmt: skip

    def observe_ab_request(
        self, *, adapter: str, version: int, experiment: int, variant: int, error: bool,
        seconds: float, ttft: float | None, output_tokens: int, unanalysed: str | None,
    ) -> None:  # fmt: skip
        labels = (adapter, str(version), str(experiment), str(variant))
        self.ab_requests.labels(*labels).inc()
        if error:
            self.ab_errors.labels(*labels).inc()
        else:
            self.ab_latency.labels(*labels).observe(seconds)
        if ttft is not None:
            self.ab_ttft.labels(*labels).observe(ttft)
        if output_tokens:
            self.ab_output_tokens.labels(*labels).inc(output_tokens)
        if unanalysed is not None:
            self.ab_unanalysed.labels(*labels, unanalysed).inc()

    def observe_adapter_load(self, adapter: str, seconds: float, *, ok: bool = True) -> None:
        self.adapter_loads.labels(adapter, "ok" if ok else "error").inc()
        if ok:
            self.adapter_load_seconds.labels(adapter).observe(seconds)

    def observe_request(
        self,
        *,
        model: str,
        endpoint: str,
        status: int,
        seconds: float | None = None,
        prompt_tokens: int = 0,
        generation_tokens: int = 0,
    ) -> None:
        self.requests.labels(model, endpoint, str(status)).inc()
        if seconds is not None and status < 400:
            self.latency.labels(model, endpoint).observe(seconds)
        if prompt_tokens:
            self.prompt_tokens.labels(model).inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.labels(model).inc(generation_tokens)
