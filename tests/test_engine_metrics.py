"""The real engine's vLLM-named metrics on /metrics, read as the Gateway API Inference
Extension's endpoint picker reads them (parser and extractor: tests/test_gie_epp.py): requests
in flight for a local adapter and a registry version show as running under the names a client
sends (`caps`, `NAME@1`), and running drops back to 0 when they end."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import openai
import pytest

from tests.support.adapters import HELD_OUT_PROMPTS
from tests.support.servers import wait_for
from tests.test_gie_epp import (
    EPP_CACHE_INFO,
    EPP_LORA,
    EppMetrics,
    check_epp_families,
    scrape,
)

pytestmark = pytest.mark.engine


async def _stream(client: openai.AsyncOpenAI, model: str, started: asyncio.Event) -> str:
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": HELD_OUT_PROMPTS[0]}],
        max_tokens=160,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},  # long enough to be seen while it runs
    )
    served = ""
    async for chunk in stream:
        served = chunk.model
        started.set()
    return served


async def _scrape_while_streaming(
    url: str, models: list[str], *, wait: bool = True
) -> list[EppMetrics]:
    """Stream one request per model at once and scrape until all end: from the moment every
    stream has produced a token with `wait`, at once without. A client per call: an async
    client's connections belong to the event loop that opened them."""
    async with openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300
    ) as client:
        events = [asyncio.Event() for _ in models]
        tasks = [
            asyncio.create_task(_stream(client, m, e)) for m, e in zip(models, events, strict=True)
        ]
        if wait:
            await asyncio.gather(*(e.wait() for e in events))
        seen = []
        while not all(task.done() for task in tasks):
            seen.append((await asyncio.to_thread(scrape, url))[1])
            await asyncio.sleep(0.05)
        served = await asyncio.gather(*tasks)
    assert served == models  # the identity that served each is the name it was asked for
    return seen


def test_running_lora_adapters_name_what_is_in_flight(real_server, test_adapters):
    name = f"gie-{uuid.uuid4().hex[:8]}"
    version = real_server.registry.register(name, test_adapters["prefix"], actor="test")
    pinned = version.ref
    models = ["caps", pinned]

    seen = asyncio.run(_scrape_while_streaming(real_server.url, models))

    assert seen, "no scrape happened while both streams ran"
    both = [m for m in seen if m.active_models >= set(models)]
    assert both, f"never saw both adapters running: {[m.active_models for m in seen]}"
    assert all(m.running_requests_size >= 2 for m in both)
    assert all(not m.errors for m in seen), seen[0].errors
    assert both[0].max_active_models == 3  # the fixture's max_loras
    assert 0.0 < max(m.kv_cache_usage_percent for m in seen) <= 1.0

    def idle() -> bool:
        _, metrics = scrape(real_server.url)
        return metrics.running_requests_size == 0 and not metrics.active_models

    wait_for(idle, timeout=30)
    _, after = scrape(real_server.url)
    assert after.waiting_queue_size == 0 and not after.waiting_models


def test_metrics_text_is_what_the_endpoint_picker_accepts(real_server, client):
    client.completions.create(model="caps", prompt="Hello", max_tokens=4)
    text = httpx.get(f"{real_server.url}/metrics").text
    families, metrics = scrape(real_server.url)  # the whole body parses: one family, one TYPE

    check_epp_families(text, model_name="smollm2")
    assert metrics.errors == []
    assert metrics.cache_block_size > 0 and metrics.cache_num_blocks > 0
    assert families[EPP_CACHE_INFO].type == "gauge"
    assert families[EPP_LORA].type == "gauge"
    kv = families["vllm:kv_cache_usage_perc"].metrics[0].value
    assert families["vllm:gpu_cache_usage_perc"].metrics[0].value == kv
    assert "loraplex_requests_total" in families  # the server's own instruments alongside


def test_an_adapter_beyond_max_loras_waits_and_is_named_waiting(real_server, test_adapters):
    """Four adapters at once on an engine with three LoRA slots: vLLM runs three and queues the
    fourth; the queue length and waiting_lora_adapters say so, as the EPP reads them."""
    name = f"gie-wait-{uuid.uuid4().hex[:8]}"
    registry = real_server.registry
    extra = [
        registry.register(name, test_adapters[a], actor="test").ref for a in ("suffix", "caps")
    ]
    models = ["caps", "prefix", *extra]

    seen = asyncio.run(_scrape_while_streaming(real_server.url, models, wait=False))

    queued = [m for m in seen if m.waiting_queue_size > 0 and m.waiting_models]
    assert queued, f"nothing ever waited: {[(m.active_models, m.waiting_models) for m in seen]}"
    assert all(m.waiting_models <= set(models) for m in queued)
    assert all(len(m.active_models) <= 3 and m.active_models <= set(models) for m in seen)
    assert all(not m.errors for m in seen), seen[0].errors
