"""The loader and the disk cache on the real engine: concurrent cold loads of several registry
versions (two of them the same bytes), and a stream abandoned before its first token, leave
no lease or in-flight request behind, and the loader's count of engine slots is the engine's."""

from __future__ import annotations

import asyncio
import re
import uuid

import httpx
import openai
import pytest

from tests.support.adapters import HELD_OUT_PROMPTS
from tests.support.servers import wait_for


def gauge(server, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", httpx.get(f"{server.url}/metrics").text, re.M)
    assert match is not None, f"{name} not exported"
    return float(match.group(1))


@pytest.mark.engine
def test_concurrent_cold_loads_and_an_abandoned_stream_leave_nothing_held(
    real_server, test_adapters
):
    registry = real_server.registry
    name = f"slots-{uuid.uuid4().hex[:8]}"
    for spec in ("caps", "prefix", "suffix", "caps"):  # versions 1 and 4: identical bytes
        registry.register(name, test_adapters[spec], actor="test")
    models = [f"{name}@{1 + i % 4}" for i in range(8)]
    messages = [{"role": "user", "content": HELD_OUT_PROMPTS[0]}]

    async def cold_loads() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=f"{real_server.url}/v1", api_key="unused", max_retries=0, timeout=300
        ) as client:
            replies = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=m, messages=messages, max_tokens=4, temperature=0
                    )
                    for m in models
                )
            )
        return [r.model for r in replies]

    assert asyncio.run(cold_loads()) == models
    with pytest.raises(httpx.ReadTimeout):  # gone before the first token
        httpx.post(
            f"{real_server.url}/v1/chat/completions",
            json={"model": f"{name}@2", "messages": messages, "stream": True, "max_tokens": 64},
            timeout=httpx.Timeout(60, read=0.001),
        )
    wait_for(
        lambda: (
            gauge(real_server, "loraplex_requests_in_flight") == 0
            and gauge(real_server, "loraplex_adapter_leases") == 0
        ),
        timeout=60,
    )
    state = real_server.app.state.loraplex
    in_engine = real_server.call(state.engine.loaded_adapters())
    assert gauge(real_server, "loraplex_adapters_loaded") == len(in_engine)
