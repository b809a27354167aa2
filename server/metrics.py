"""Prometheus instruments of the server, created against an injected registry so that tests can
build many apps in one process. Labels are bounded: `model` is always a resolved served name
(base name or adapter identity), never a string the client made up; unknown models count as
"unknown". It also renders the engine's vLLM-named metrics (`vllm:*`), which routers read.
"""

# Engine metrics for the Gateway API Inference Extension (GIE) endpoint picker (EPP).
#
# EPP scrapes every pool member's GET /metrics and routes on what it finds there. What it reads
# was taken from the source, not the docs:
#   llm-d/llm-d-router @ ebab687927f5331c1b39defcb579a07951bce56c (where the EPP lives since
#     June 2026; GIE's README points there):
#     pkg/epp/framework/plugins/datalayer/source/metrics/datasource.go  (scrape + parse)
#     pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go (the vLLM names)
#     pkg/epp/framework/plugins/datalayer/extractor/metrics/extractor.go (what it takes)
#     pkg/epp/framework/plugins/datalayer/extractor/metrics/spec.go, loraspec.go (which sample)
#     pkg/epp/framework/plugins/scheduling/scorer/loraaffinity/lora_affinity.go (how LoRA is used)
#   kubernetes-sigs/gateway-api-inference-extension @ 1748e829d1161147aaf35e76699ec86fd88406d2
#     (the last commit before its EPP moved out): the same files under the same paths, same rules.
#
# The rules, as that code applies them:
# - The body is parsed by Prometheus' expfmt.TextParser with model.LegacyValidation: the whole
#   scrape fails on one malformed line or on a second HELP/TYPE line for a family.
# - vLLM names (engine "vllm", the default for pods without an `llm-d.ai/engine-type` label):
#   queue = vllm:num_requests_waiting, running = vllm:num_requests_running,
#   KV-cache use = vllm:kv_cache_usage_perc (0..1; EPPs before GIE v1.3, #1905, read
#   vllm:gpu_cache_usage_perc, which loraplex also exports), LoRA = vllm:lora_requests_info,
#   cache geometry = vllm:cache_config_info (labels block_size, num_gpu_blocks, parsed with
#   strconv.Atoi; used to auto-tune the approximate prefix-cache scorer).
# - A scalar is the gauge's (or counter's) value; an untyped family reads as 0. Among several
#   series of a family the first one with the largest timestamp wins, and since /metrics
#   carries no timestamps that is simply the first series. A missing family is an error for that
#   one metric (the other metrics still update), so loraplex always exports the three scalars.
# - vllm:lora_requests_info: each label combination is its own series whose VALUE is the time
#   it was last set (vLLM's set_to_current_time); EPP takes the series with the largest value.
#   Labels: running_lora_adapters and waiting_lora_adapters are comma-separated adapter names
#   (each entry trimmed, empty entries dropped), max_lora an integer (strconv.Atoi). A missing
#   family means "no LoRA information" (no error). The LoRA affinity scorer matches the
#   request's target model string exactly against those names, so they are the names a client
#   sends: loraplex's engine knows an adapter by its identity, `NAME@VERSION` for registry
#   versions (server.adapter_loader) and the local name for `--adapter NAME=PATH` folders.
#
# Which values: vLLM's own PrometheusStatLogger, which the in-process AsyncLLM runs by default
# (log_stats), writes these to prometheus_client's global REGISTRY from the engine core's
# scheduler stats; the vLLM engine hands them over unchanged (server.engine_vllm). While the
# engine is not ready the three scalars read 0 and the LoRA and cache-config families are absent.

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

# vLLM's names, HELP texts and labels (vllm/v1/metrics/loggers.py, PrometheusStatLogger).
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
VLLM_GPU_CACHE_USAGE = "vllm:gpu_cache_usage_perc"  # vLLM's earlier name, which older EPPs read
VLLM_LORA_INFO = "vllm:lora_requests_info"
VLLM_PREFIX = "vllm:"
_ENGINE_LABELS = ("model_name", "engine")
_HELP = {
    VLLM_RUNNING: "Number of requests in model execution batches.",
    VLLM_WAITING: "Number of requests waiting to be processed.",
    VLLM_KV_CACHE_USAGE: "KV-cache usage. 1 means 100 percent usage.",
    VLLM_GPU_CACHE_USAGE: "KV-cache usage. 1 means 100 percent usage (the name vLLM used "
    "before vllm:kv_cache_usage_perc; same value).",
    VLLM_LORA_INFO: "Running stats on lora requests.",
}
LORA_LABELS = ("max_lora", "waiting_lora_adapters", "running_lora_adapters")

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


class EngineMetricsSource(Protocol):
    """What /metrics needs from the engine (`server.engine.Engine` has it)."""

    def metric_families(self) -> Iterable[Metric]: ...


def engine_gauges(
    *, model_name: str, running: int, waiting: int, kv_cache_usage: float
) -> list[Metric]:
    """The scalar gauges EPP reads, under vLLM's names and labels (engine index 0), plus the
    older KV-cache name with the same value."""
    families = []
    for name, value in (
        (VLLM_RUNNING, running),
        (VLLM_WAITING, waiting),
        (VLLM_KV_CACHE_USAGE, kv_cache_usage),
        (VLLM_GPU_CACHE_USAGE, kv_cache_usage),
    ):
        family = GaugeMetricFamily(name, _HELP[name], labels=_ENGINE_LABELS)
        family.add_metric([model_name, "0"], value)
        families.append(family)
    return families


def with_legacy_kv_name(families: Iterable[Metric]) -> Iterator[Metric]:
    """`families` and, after vllm:kv_cache_usage_perc, a copy of it named
    vllm:gpu_cache_usage_perc (for EPPs that still read the old name), unless present."""
    families = list(families)
    names = {family.name for family in families}
    for family in families:
        yield family
        if family.name == VLLM_KV_CACHE_USAGE and VLLM_GPU_CACHE_USAGE not in names:
            legacy = Metric(VLLM_GPU_CACHE_USAGE, _HELP[VLLM_GPU_CACHE_USAGE], "gauge")
            for sample in family.samples:
                legacy.add_sample(VLLM_GPU_CACHE_USAGE, sample.labels, sample.value)
            yield legacy


class LoraRequestsInfo:
    """vllm:lora_requests_info kept as vLLM keeps it: a new combination of running and waiting
    adapters becomes a series valued with the time it was last seen (EPP takes the latest)."""

    def __init__(self, *, max_lora: int):
        self.max_lora = max_lora
        self._series: dict[tuple[str, str], float] = {}
        self._last = 0.0

    def record(self, running: Iterable[str], waiting: Iterable[str] = ()) -> None:
        key = (",".join(dict.fromkeys(running)), ",".join(dict.fromkeys(waiting)))
        # Strictly increasing: EPP keeps the first of equal values, which may be an older one.
        self._last = max(time.time(), self._last + 1e-6)
        self._series[key] = self._last

    def family(self) -> Metric | None:
        """The family as vLLM exports it (adapter lists comma-joined), None before any record."""
        if not self._series:
            return None
        family = GaugeMetricFamily(VLLM_LORA_INFO, _HELP[VLLM_LORA_INFO], labels=LORA_LABELS)
        for (running, waiting), stamp in self._series.items():
            family.add_metric([str(self.max_lora), waiting, running], stamp)
        return family


class _Families:
    def __init__(self, families: Iterable[Metric]):
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def render_metrics(registry: CollectorRegistry, engine: EngineMetricsSource) -> bytes:
    """The /metrics body: the server's instruments, then the engine's `vllm:*` families."""
    return generate_latest(registry) + generate_latest(_Families(engine.metric_families()))
