"""Server fixtures: one real vLLM-backed server per session, and cheap fake-engine servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from prometheus_client import CollectorRegistry

from server.app import create_app
from server.engine_fake import FakeEngine
from server.metrics import ServerMetrics
from server.targets import LocalAdapters
from tests.support.servers import ServerThread

BASE_NAME = "smollm2"


@pytest.fixture(scope="session")
def real_server(embedded_model_dir: Path, test_adapters: dict[str, Path]) -> Iterator[ServerThread]:
    """loraplex on the real engine and embedded model, with the test adapters preloaded."""
    from server.engine_vllm import VllmEngine, VllmEngineSettings

    engine = VllmEngine(
        VllmEngineSettings(
            model_path=str(embedded_model_dir),
            served_name=BASE_NAME,
            max_model_len=1024,
            max_loras=4,
            max_lora_rank=16,
            max_num_seqs=16,
            kv_cache_gib=1,  # small: the suite shares 2 cores and this one engine
        )
    )
    metrics = ServerMetrics(CollectorRegistry())
    local = LocalAdapters(engine, base_name=BASE_NAME, adapters=test_adapters, metrics=metrics)
    local.validate(max_rank=16)
    server = ServerThread(create_app(engine=engine, resolver=local, metrics=metrics))
    server.start()
    server.wait_ready(timeout=900)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(real_server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{real_server.url}/v1", api_key="unused", max_retries=0, timeout=300
    )


@pytest.fixture(scope="session")
def async_client(real_server: ServerThread) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{real_server.url}/v1", api_key="unused", max_retries=0, timeout=300
    )


@pytest.fixture
def fake_server() -> Iterator[Callable[..., ServerThread]]:
    """Factory: start a server on a `FakeEngine`; every one started is stopped afterwards."""
    started: list[ServerThread] = []

    def make(
        *,
        adapters: dict[str, str] | None = None,
        api_keys: list[str] | None = None,
        engine: FakeEngine | None = None,
        wait: bool = True,
    ) -> ServerThread:
        engine = engine or FakeEngine()
        metrics = ServerMetrics(CollectorRegistry())
        paths = {name: Path(p) for name, p in (adapters or {}).items()}
        local = LocalAdapters(engine, base_name="fake", adapters=paths, metrics=metrics)
        app = create_app(engine=engine, resolver=local, metrics=metrics, api_keys=api_keys)
        server = ServerThread(app).start(timeout=30)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield make
    for server in started:
        server.stop()
