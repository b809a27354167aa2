"""A loraplex server on the fake engine, with one local adapter, for the conformance runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry

from server.app import create_app
from server.engine_fake import FakeEngine
from server.metrics import ServerMetrics
from server.targets import LocalAdapters
from tests.support.servers import ServerThread


@contextmanager
def conformance_fake_server() -> Iterator[tuple[str, list[str]]]:
    """(base URL, model names) of a running server; the base model and an adapter."""
    engine = FakeEngine()
    metrics = ServerMetrics(CollectorRegistry())
    local = LocalAdapters(
        engine, base_name="fake", adapters={"support": Path("good/support")}, metrics=metrics
    )
    server = ServerThread(create_app(engine=engine, resolver=local, metrics=metrics))
    server.start(timeout=30)
    try:
        server.wait_ready()
        yield server.url, ["fake", "support"]
    finally:
        server.stop()
