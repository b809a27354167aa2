"""The workload: fixed chat prompts, scenarios (which model serves each request), and the
per-request and per-scenario figures every system is judged by.

It knows nothing about how a system serves requests: `_load` drives HTTP servers through the
`loadtest` library and turns its summary into a `ScenarioResult`; `_peft_loop` drives a
transformers model and produces `RequestResult`s that `summarize` turns into one.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from bench._adapters import ADAPTER_NAMES, ALL_ADAPTER_NAMES

BASE_MODEL = "smollm2"

PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Give me three tips for learning to cook.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about autumn rain.",
    "Why is the sky blue?",
    "Suggest a name for a small coffee shop.",
    "How do plants make their food?",
    "What should I pack for a weekend hike?",
    "Describe a cat to someone who has never seen one.",
    "What is the difference between weather and climate?",
    "Tell me a fun fact about the ocean.",
    "How can I sleep better at night?",
    "What does a software engineer do all day?",
    "Explain recursion to a ten-year-old.",
    "List three healthy breakfast ideas.",
    "What makes a good friend?",
)

SCENARIOS: dict[str, tuple[str, ...]] = {
    "base": (BASE_MODEL,),
    "one": (ADAPTER_NAMES[0],),
    "mixed": ADAPTER_NAMES,  # round-robin, one adapter per request in turn
    "mixed8": ALL_ADAPTER_NAMES,  # the same over 8 adapters (run with --max-loras 8)
}


@dataclass(frozen=True, slots=True)
class WorkItem:
    index: int
    model: str  # served model name: the base model or an adapter
    prompt: str


@dataclass(frozen=True, slots=True)
class RequestResult:
    ttft_seconds: float
    e2e_seconds: float
    output_tokens: int


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    requests: int
    concurrency: int
    output_tokens_total: int
    wall_seconds: float
    output_tokens_per_second: float
    ttft_median_ms: float
    ttft_p90_ms: float
    e2e_median_ms: float
    models: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def work_items(scenario: str, *, requests: int) -> list[WorkItem]:
    """The `requests` requests of a scenario: prompts cycled, models round-robin."""
    models = SCENARIOS[scenario]
    return [
        WorkItem(index=i, model=models[i % len(models)], prompt=PROMPTS[i % len(PROMPTS)])
        for i in range(requests)
    ]


def warmup_items(scenario: str) -> list[WorkItem]:
    """At least two requests, and at least one per model of the scenario; never counted."""
    models = SCENARIOS[scenario]
    count = max(2, len(models))
    return [
        WorkItem(index=-1 - i, model=models[i % len(models)], prompt=PROMPTS[-1 - i])
        for i in range(count)
    ]


def chat_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(
    results: list[RequestResult], *, wall_seconds: float, concurrency: int, scenario: str
) -> ScenarioResult:
    tokens = sum(r.output_tokens for r in results)
    ttfts = [r.ttft_seconds * 1000 for r in results]
    return ScenarioResult(
        requests=len(results),
        concurrency=concurrency,
        output_tokens_total=tokens,
        wall_seconds=round(wall_seconds, 3),
        output_tokens_per_second=round(tokens / wall_seconds, 2),
        ttft_median_ms=round(statistics.median(ttfts), 1),
        ttft_p90_ms=round(percentile(ttfts, 90), 1),
        e2e_median_ms=round(statistics.median(r.e2e_seconds * 1000 for r in results), 1),
        models=SCENARIOS[scenario],
    )
