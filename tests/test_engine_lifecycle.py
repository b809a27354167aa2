"""A server's life on the fake engine: requests are admitted only once startup has finished, and
an engine that dies is visible to the supervisor (/health fails, the owner is told once). Fast:
no model involved. The same with the real engine in a `loraplex serve` process:
tests/test_serve_process.py."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from server.app import create_app
from server.engine import AdapterHandle
from server.engine_fake import FakeEngine
from server.metrics import ServerMetrics
from server.targets import LocalAdapters
from tests.support.servers import ServerThread, wait_for

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


class SlowAdapterEngine(FakeEngine):
    """Starts at once but takes `load_seconds` to load each adapter: the server is up, the
    engine ready, startup (the adapter preload) not finished."""

    def __init__(self, load_seconds: float):
        super().__init__()
        self.load_seconds = load_seconds

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        await asyncio.sleep(self.load_seconds)
        await super().add_adapter(adapter)


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error["message"]


def test_requests_wait_until_the_adapters_are_preloaded(fake_server):
    engine = SlowAdapterEngine(load_seconds=3)
    server = fake_server(engine=engine, adapters={"support": "good/support"}, wait=False)
    wait_for(lambda: engine.ready, timeout=10)  # the engine serves; startup is not over
    assert httpx.get(f"{server.url}/health").status_code == 200
    message = _error(
        httpx.post(f"{server.url}/v1/chat/completions", json=CHAT), 503, "engine_not_ready"
    )
    assert "starting" in message
    assert engine.requests == []  # nothing reached the engine
    server.wait_ready(timeout=30)
    assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_a_dead_engine_fails_health_ready_and_every_request(fake_server):
    engine = FakeEngine()
    server = fake_server(engine=engine)
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    engine.kill("EngineCore was killed by SIGKILL")

    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503
    assert health.json()["status"] == "dead" and "SIGKILL" in health.json()["reason"]
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 503 and ready.json()["reason"].startswith("engine dead")
    message = _error(httpx.post(f"{server.url}/v1/chat/completions", json=CHAT), 503, "engine_dead")
    assert "SIGKILL" in message
    body = {"model": "fake", "prompt": "hi"}
    _error(httpx.post(f"{server.url}/v1/completions", json=body), 503, "engine_dead")
    with pytest.raises(openai.InternalServerError, match="engine"):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0).completions.create(
            model="fake", prompt="hi"
        )


def test_engine_death_is_reported_once_to_the_owner():
    engine = FakeEngine()
    deaths: list[str] = []
    metrics = ServerMetrics(CollectorRegistry())
    app = create_app(
        engine=engine,
        resolver=LocalAdapters(engine, base_name="fake", adapters={}, metrics=metrics),
        metrics=metrics,
        on_engine_dead=deaths.append,
    )
    server = ServerThread(app).start(timeout=30)
    try:
        server.wait_ready()
        assert deaths == []
        engine.kill("core exited with code 1")
        seconds = wait_for(lambda: bool(deaths), timeout=5)
        assert seconds < 2  # the watch polls twice a second
        time.sleep(1.2)  # more polls: still told once
        assert deaths == ["The engine has stopped: core exited with code 1."]
        assert metrics.registry.get_sample_value("loraplex_engine_ready") == 0
    finally:
        server.stop()


def test_a_stream_fails_when_the_engine_dies_mid_stream(fake_server):
    engine = FakeEngine(token_delay=0.2)
    server = fake_server(engine=engine)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(**CHAT, stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.content
    engine.kill("gone")
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    assert httpx.get(f"{server.url}/health").status_code == 503


def test_the_drain_ends_requests_still_running_with_an_error_of_their_own(fake_server):
    engine = FakeEngine(token_delay=0.3)  # the answer takes ~3 s
    server = fake_server(engine=engine)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(**CHAT, stream=True)
    assert next(iter(stream)).choices[0].delta.content

    async def stop_signal() -> None:  # what `loraplex serve` does on SIGINT/SIGTERM
        server.app.state.loraplex_lifecycle.drain(0.5)

    started = time.monotonic()
    server.call(stop_signal())
    with pytest.raises(openai.APIError, match="shutting down"):
        for _ in stream:
            pass
    assert 0.4 < time.monotonic() - started < 1.5  # it had its drain time, then no more
