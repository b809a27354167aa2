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
from server.settings import ServeSettings
from server.targets import LocalAdapters
from tests.support.servers import ServerThread

BASE_NAME = "smollm2"
ADMIN_KEY = "test-admin-key"


@pytest.fixture(scope="session")
def real_server(
    embedded_model_dir: Path, test_adapters: dict[str, Path], tmp_path_factory
) -> Iterator[ServerThread]:
    """loraplex on the real engine and embedded model, wired as `loraplex serve` wires it: the
    test adapters as local folders, plus an (initially empty) registry of its own."""
    from server.runner import build_engine, build_resolver

    home = tmp_path_factory.mktemp("loraplex-home")
    settings = ServeSettings(
        home=home,
        served_name=BASE_NAME,
        adapters=[f"{name}={path}" for name, path in sorted(test_adapters.items())],
        max_model_len=1024,
        # As many slots as test adapters: the last slot then holds an adapter, which is what
        # vLLM's CPU ops wrongly apply to base rows (the isolation test's defect).
        max_loras=3,
        max_lora_rank=16,
        max_num_seqs=16,
        kv_cache_gib=1,  # small: the suite shares 2 cores and this one engine
        registry_poll_seconds=0.5,
        ab_analysis_seconds=0.5,
        admin_key=ADMIN_KEY,
    )
    engine = build_engine(settings, model_dir=embedded_model_dir)
    metrics = ServerMetrics(CollectorRegistry())
    resolver, registry = build_resolver(settings, engine=engine, metrics=metrics)
    app = create_app(
        engine=engine, resolver=resolver, metrics=metrics, registry=registry, admin_key=ADMIN_KEY
    )
    server = ServerThread(app)
    server.registry = registry
    server.start()
    server.wait_ready(timeout=900)
    yield server
    server.stop()
    registry.close()


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
        admin_key: str | None = None,
    ) -> ServerThread:
        engine = engine or FakeEngine()
        metrics = ServerMetrics(CollectorRegistry())
        paths = {name: Path(p) for name, p in (adapters or {}).items()}
        local = LocalAdapters(engine, base_name="fake", adapters=paths, metrics=metrics)
        app = create_app(
            engine=engine, resolver=local, metrics=metrics, api_keys=api_keys, admin_key=admin_key
        )
        server = ServerThread(app).start(timeout=30)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield make
    for server in started:
        server.stop()
