"""Closed-loop load against an OpenAI-compatible server: streaming chat completions over httpx.

At most `concurrency` requests are in flight (a semaphore); each one is timed from just before it
is sent. TTFT is the arrival of the first chunk carrying non-empty content (not the role-only
chunk); the output token count comes from the final usage chunk (`stream_options.include_usage`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from bench._workload import RequestResult, ScenarioResult, WorkItem, chat_messages, summarize

REQUEST_TIMEOUT_SECONDS = 600.0


class BenchRequestError(Exception):
    """A benchmark request failed or its response broke the expected shape."""


@dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0


def _body(item: WorkItem, sampling: Sampling) -> dict[str, object]:
    return {
        "model": item.model,
        "messages": chat_messages(item.prompt),
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "ignore_eos": True,  # vLLM extension: every request produces exactly max_tokens
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def run_one(client: httpx.AsyncClient, item: WorkItem, sampling: Sampling) -> RequestResult:
    started = time.perf_counter()
    first_content: float | None = None
    output_tokens: int | None = None
    async with client.stream("POST", "/v1/chat/completions", json=_body(item, sampling)) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode(errors="replace")[:500]
            raise BenchRequestError(f"{item.model}: HTTP {resp.status_code}: {body}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise BenchRequestError(f"{item.model}: stream error: {chunk['error']}")
            if first_content is None and any(
                (c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()
            ):
                first_content = time.perf_counter()
            if chunk.get("usage"):
                output_tokens = int(chunk["usage"]["completion_tokens"])
    ended = time.perf_counter()
    if first_content is None or output_tokens is None:
        raise BenchRequestError(f"{item.model}: stream had no content or no usage chunk")
    return RequestResult(
        ttft_seconds=first_content - started,
        e2e_seconds=ended - started,
        output_tokens=output_tokens,
    )


async def run_closed_loop(
    base_url: str,
    items: list[WorkItem],
    *,
    concurrency: int,
    sampling: Sampling,
) -> tuple[list[RequestResult], float]:
    """Send every item with at most `concurrency` in flight; return results and wall seconds."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_SECONDS)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:

        async def bounded(item: WorkItem) -> RequestResult:
            async with semaphore:
                return await run_one(client, item, sampling)

        started = time.perf_counter()
        results = await asyncio.gather(*(bounded(item) for item in items))
        wall = time.perf_counter() - started
    return list(results), wall


def measure_scenario(
    base_url: str,
    *,
    scenario: str,
    items: list[WorkItem],
    warmup: list[WorkItem],
    concurrency: int,
    sampling: Sampling,
) -> ScenarioResult:
    warm_sampling = Sampling(max_tokens=min(8, sampling.max_tokens))
    asyncio.run(run_closed_loop(base_url, warmup, concurrency=concurrency, sampling=warm_sampling))
    results, wall = asyncio.run(
        run_closed_loop(base_url, items, concurrency=concurrency, sampling=sampling)
    )
    return summarize(results, wall_seconds=wall, concurrency=concurrency, scenario=scenario)
