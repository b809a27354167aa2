"""The server side of the registry on a fake engine (fast): routing follows alias moves, versions
are downloaded (S3 API) and loaded once, and faults degrade service instead of breaking it —
a dead artifact store leaves cached versions serving and refuses uncached ones with 503; a
database that refuses connections leaves the last routing table serving, reports degraded
readiness, and recovers by itself. Real PostgreSQL, a real S3 API over HTTP, real HTTP."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from registry.artifacts import S3ArtifactStore, open_artifact_store
from registry.service import Registry
from registry.settings import RegistrySettings
from server.adapter_cache import AdapterDiskCache
from server.adapter_loader import AdapterLoader
from server.app import create_app
from server.engine_fake import FakeEngine
from server.metrics import ServerMetrics
from server.registry_resolver import RegistryResolver
from server.targets import LocalAdapters
from tests.support.servers import ServerThread, free_port

pytestmark = pytest.mark.postgres


def wait_for(predicate: Callable[[], bool], *, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


class Stack:
    """A fake-engine server resolving through a real registry."""

    def __init__(
        self, tmp_path: Path, registry: Registry, artifacts, *, token_delay: float = 0.0
    ) -> None:
        self.engine = FakeEngine(token_delay=token_delay)
        self.metrics = ServerMetrics(CollectorRegistry())
        cache = AdapterDiskCache(
            tmp_path / "cache", artifacts=artifacts, max_bytes=10**9, metrics=self.metrics
        )
        loader = AdapterLoader(self.engine, cache, metrics=self.metrics, max_loaded=8, max_rank=16)
        local = LocalAdapters(self.engine, base_name="fake", adapters={}, metrics=self.metrics)
        self.resolver = RegistryResolver(
            registry.store, loader, local=local, metrics=self.metrics, poll_seconds=0.1
        )
        app = create_app(engine=self.engine, resolver=self.resolver, metrics=self.metrics)
        self.server = ServerThread(app).start()
        self.server.wait_ready()
        self.client = openai.OpenAI(base_url=f"{self.server.url}/v1", api_key="x", max_retries=0)

    def served(self, model: str) -> str:
        reply = self.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        return reply.model

    def ready(self) -> dict:
        return httpx.get(f"{self.server.url}/ready").json()


def two_versions_first_live(registry: Registry, make_adapter: Callable[..., Path]) -> None:
    """support@1 and support@2 registered, production on 1."""
    registry.register("support", make_adapter(), actor="t")
    registry.register("support", make_adapter(), actor="t")
    registry.store.promote("support", 1, actor="t")


@pytest.fixture
def registry_on_postgres_and_s3(tmp_path, postgres_url, s3_url) -> Iterator[Registry]:
    settings = RegistrySettings(home=tmp_path / "home", registry=postgres_url, artifacts=s3_url)
    with Registry.open(settings) as registry:
        yield registry


@pytest.fixture
def stacks() -> Iterator[list[Stack]]:
    started: list[Stack] = []
    yield started
    for stack in started:
        stack.server.stop()


def test_routing_follows_the_registry_and_loads_once(
    tmp_path, registry_on_postgres_and_s3, make_adapter, stacks
):
    registry = registry_on_postgres_and_s3
    for _ in range(2):
        registry.register("support", make_adapter(), actor="t")
    registry.store.promote("support", 1, actor="t")
    stack = Stack(tmp_path, registry, registry.artifacts)
    stacks.append(stack)
    assert stack.served("support") == "support@1"
    registry.store.promote("support", 2, actor="t")
    wait_for(lambda: stack.served("support") == "support@2")
    registry.store.rollback("support", actor="t")
    wait_for(lambda: stack.served("support") == "support@1")
    assert stack.served("support@2") == "support@2"
    ids = {r.adapter.key: r.adapter.engine_id for r in stack.engine.requests if r.adapter}
    assert ids == {"support@1": ids["support@1"], "support@2": ids["support@2"]}
    assert ids["support@1"] != ids["support@2"]
    loads = stack.metrics.adapter_loads.labels("support@2", "ok")._value.get()
    assert loads == 1  # warmed once on promotion, never reloaded


def test_dead_artifact_store_keeps_cached_versions_serving(
    tmp_path, registry_on_postgres_and_s3, make_adapter, stacks
):
    registry = registry_on_postgres_and_s3
    two_versions_first_live(registry, make_adapter)
    v1 = registry.store.get_version("support", 1)
    # The replica's cache already holds v1; its artifact store endpoint is down.
    registry.fetch(v1, tmp_path / "cache" / v1.sha256)
    import boto3

    dead = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}")
    bucket = registry.artifacts.url.split("/")[2]
    stack = Stack(tmp_path, registry, S3ArtifactStore(bucket, "adapters", client=dead))
    stacks.append(stack)
    assert stack.served("support") == "support@1"
    with pytest.raises(openai.InternalServerError) as info:
        stack.served("support@2")
    assert info.value.status_code == 503
    assert "support@2 is not cached" in str(info.value)
    assert stack.served("support") == "support@1"  # and nothing else broke


@contextmanager
def database_refusing_connections(postgres_url: str) -> Iterator[None]:
    """The registry's database refuses every connection (and drops the open ones) inside."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    admin_dsn = url.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (url.database,),
        )
        try:
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS true')


def test_database_outage_serves_the_last_routing_table_and_recovers(
    tmp_path, registry_on_postgres_and_s3, make_adapter, stacks, postgres_url
):
    registry = registry_on_postgres_and_s3
    registry.register("support", make_adapter(), actor="t")
    registry.store.promote("support", 1, actor="t")
    stack = Stack(tmp_path, registry, open_artifact_store(registry.artifacts.url))
    stacks.append(stack)
    assert stack.served("support") == "support@1"
    with database_refusing_connections(postgres_url):
        wait_for(lambda: stack.ready().get("status") == "degraded")
        assert "registry unreadable" in stack.ready()["reason"]
        assert stack.served("support") == "support@1"  # still serving
    wait_for(lambda: stack.ready().get("status") == "ready")
    registry.register("support", make_adapter(), actor="t")
    registry.store.promote("support", 2, actor="t")
    wait_for(lambda: stack.served("support") == "support@2")


def test_during_a_database_outage_what_needs_the_database_is_an_honest_503(
    tmp_path, registry_on_postgres_and_s3, make_adapter, stacks, postgres_url
):
    registry = registry_on_postgres_and_s3
    two_versions_first_live(registry, make_adapter)
    stack = Stack(tmp_path, registry, registry.artifacts)
    stacks.append(stack)
    assert stack.served("support") == "support@1"
    needs_the_database = {
        "suport": "cannot tell whether 'suport' exists",  # mistyped: not a false 404
        "brand-new": "cannot tell whether 'brand-new' exists",  # perhaps registered since
        "support@2": "'support@2' cannot be resolved here now",  # pinned, never fetched
        "support@canary": "'support@canary' cannot be resolved here now",  # not in the table
    }
    with database_refusing_connections(postgres_url):
        wait_for(lambda: stack.ready().get("status") == "degraded")
        for model, message in needs_the_database.items():
            with pytest.raises(openai.InternalServerError) as info:
                stack.served(model)
            assert info.value.status_code == 503, model
            assert info.value.body["type"] == "service_unavailable_error"
            assert "registry is unavailable" in info.value.body["message"]
            assert message in info.value.body["message"]
        assert stack.served("support") == "support@1"  # what the replica has keeps serving
        assert stack.served("support@1") == "support@1"
    wait_for(lambda: stack.served("support@2") == "support@2")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        stack.served("suport")


def test_requests_in_flight_finish_on_the_version_they_started_with(
    tmp_path, registry_on_postgres_and_s3, make_adapter, stacks
):
    registry = registry_on_postgres_and_s3
    two_versions_first_live(registry, make_adapter)
    stack = Stack(tmp_path, registry, registry.artifacts, token_delay=0.15)
    stacks.append(stack)
    stream = stack.client.chat.completions.create(
        model="support", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [next(stream)]
    registry.store.promote("support", 2, actor="t")
    wait_for(lambda: stack.served("support") == "support@2")  # new requests: v2
    chunks += list(stream)  # the old one is still streaming v1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert {c.model for c in chunks} == {"support@1"}
    assert text.startswith("[support@1]") and text.endswith("lazy dog")
