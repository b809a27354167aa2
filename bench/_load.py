"""Closed-loop load against an HTTP system under test, driven by the `loadtest` library.

A scenario's requests (`_workload.work_items`) are written to a JSONL prompt file that loadtest
replays in order (`prompt_order="sequential"`) with the scenario's models assigned round-robin:
request i gets exactly the prompt and model of item i. Greedy, exactly `max_tokens` output tokens
(`ignore_eos`), streamed chat completions, at most `concurrency` requests in flight. The figures
come from loadtest's summary, so the bench reports what `loraplex loadtest` reports (checked
against `vllm bench serve` by bench/loadtest_agreement.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

from bench._workload import ScenarioResult, WorkItem, chat_messages
from loadtest.report import write_report
from loadtest.runner import LoadSettings, build_workload, run_load

REQUEST_TIMEOUT_SECONDS = 600.0
WARMUP_MAX_TOKENS = 8
GREEDY: dict[str, Any] = {"temperature": 0.0}


class BenchRequestError(Exception):
    """Requests of a measurement failed: a figure from fewer requests than asked would mislead."""


def round_robin_models(items: list[WorkItem]) -> tuple[str, ...]:
    """The models the items take in turn (item i: model i mod n), which loadtest can reproduce."""
    models = tuple(dict.fromkeys(item.model for item in items))
    if not models or any(item.model != models[i % len(models)] for i, item in enumerate(items)):
        raise ValueError("the items' models must cycle round-robin from the first item")
    return models


def write_prompts(items: list[WorkItem], path: Path) -> Path:
    """The items' prompts as loadtest's JSONL, one chat request per line, in the items' order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"messages": chat_messages(item.prompt)}) for item in items)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def load_settings(
    base_url: str,
    items: list[WorkItem],
    *,
    concurrency: int,
    max_tokens: int,
    prompts: Path,
    rate: float | None = None,
) -> LoadSettings:
    """Send each item once, in order (`prompts` holds their prompts): a closed loop, or with
    `rate` one request every 1/rate seconds, at most `concurrency` in flight."""
    return mix_settings(
        base_url, round_robin_models(items), mix="round-robin", requests=len(items),
        concurrency=concurrency, max_tokens=max_tokens, prompts=prompts, rate=rate,
    )  # fmt: skip


def mix_settings(
    base_url: str,
    models: tuple[str, ...],
    *,
    mix: str,
    requests: int,
    concurrency: int,
    max_tokens: int,
    prompts: Path,
    rate: float | None = None,
    seed: int = 0,
) -> LoadSettings:
    """`requests` requests over `prompts` in order (cycled), each on a model that `mix` picks
    (loadtest's `--mix`, drawn from `seed`): greedy, exactly `max_tokens` output tokens."""
    return LoadSettings(
        url=base_url,
        models=models,
        mix=mix,
        rate=rate,
        arrival="constant",
        concurrency=concurrency,
        requests=requests,
        prompts=prompts,
        prompt_order="sequential",
        output_len=str(max_tokens),
        ignore_eos=True,
        timeout=REQUEST_TIMEOUT_SECONDS,
        seed=seed,
    )


def run_items(
    base_url: str,
    items: list[WorkItem],
    *,
    concurrency: int,
    max_tokens: int,
    folder: Path,
    name: str,
    rate: float | None = None,
) -> dict[str, Any]:
    """Send `items` through loadtest; return its summary (also written, with requests.csv, to
    `folder/name/`, for a look at single requests afterwards)."""
    prompts = write_prompts(items, folder / f"{name}.jsonl")
    settings = load_settings(
        base_url, items, concurrency=concurrency, max_tokens=max_tokens, prompts=prompts, rate=rate
    )
    return run_settings(settings, folder / name)


def run_settings(settings: LoadSettings, folder: Path) -> dict[str, Any]:
    """Run one load greedily; return loadtest's summary (also written, with requests.csv, to
    `folder`)."""
    workload = dataclasses.replace(build_workload(settings), extra_body=dict(GREEDY))
    result = asyncio.run(run_load(settings, workload=workload))
    return write_report(result, folder, plots=False)


def checked(summary: dict[str, Any]) -> dict[str, Any]:
    """`summary` as given, once every request succeeded and was counted by the server
    (`usage`), as every figure taken from it assumes."""
    overall = summary["overall"]
    completed = overall["completed"]
    problems = []
    if overall["failed"] or completed != summary["sent"]:
        problems.append(
            f"{completed} of {summary['sent']} requests succeeded "
            f"(errors: {overall['errors_by_status']})"
        )
    if overall["token_source"] != {"usage": completed}:
        problems.append(f"output tokens not all from a usage chunk: {overall['token_source']}")
    if problems:
        raise BenchRequestError("; ".join(problems))
    return summary


def scenario_result(summary: dict[str, Any]) -> ScenarioResult:
    """The bench's figures from a loadtest summary (`checked` first)."""
    overall = checked(summary)["overall"]
    completed = overall["completed"]
    return ScenarioResult(
        requests=completed,
        concurrency=summary["settings"]["concurrency"],
        output_tokens_total=overall["output_tokens"],
        wall_seconds=round(summary["window"]["duration_s"], 3),
        output_tokens_per_second=round(overall["output_token_throughput"], 2),
        ttft_median_ms=round(overall["ttft_ms"]["p50"], 1),
        ttft_p90_ms=round(overall["ttft_ms"]["p90"], 1),
        e2e_median_ms=round(overall["e2e_ms"]["p50"], 1),
        models=tuple(summary["settings"]["models"]),
    )


def measure_scenario(
    base_url: str,
    *,
    items: list[WorkItem],
    warmup: list[WorkItem],
    concurrency: int,
    max_tokens: int,
    folder: Path,
) -> ScenarioResult:
    """Warm up with short requests (not counted), then measure `items`."""
    scenario_result(
        run_items(
            base_url, warmup, concurrency=concurrency,
            max_tokens=min(WARMUP_MAX_TOKENS, max_tokens), folder=folder, name="warmup",
        )
    )  # fmt: skip
    summary = run_items(
        base_url, items, concurrency=concurrency, max_tokens=max_tokens, folder=folder,
        name="measured",
    )  # fmt: skip
    return scenario_result(summary)
