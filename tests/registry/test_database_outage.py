"""A database outage is one error, wrapped once in the store: RegistryUnavailableError from the
library, one line and exit 1 from the CLI, 503 in OpenAI's shape from the admin API, and
service resumes by itself when the database is back. Outages are real: a PostgreSQL cluster
stopped mid-test, a SQLite file whose pages were overwritten."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url

from registry.errors import RegistryUnavailableError
from registry.service import Registry
from registry.settings import RegistrySettings
from server.app import create_app
from server.engine_fake import FakeEngine
from server.metrics import ServerMetrics
from server.targets import LocalAdapters
from tests.support.servers import ServerThread

LORAPLEX = str(Path(sys.executable).with_name("loraplex"))
ADMIN_KEY = "outage-admin-key"


def fresh_database(cluster) -> str:
    import psycopg

    name = f"outage_{uuid.uuid4().hex[:12]}"
    admin = make_url(cluster.url).set(drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(cluster.url).set(database=name).render_as_string(hide_password=False)


def registry_cli(*args: str, url: str, artifacts: Path) -> subprocess.CompletedProcess:
    command = [LORAPLEX, "registry", *args, "--registry", url, "--artifacts", artifacts.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *, contains: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and contains in lines[0], lines


@pytest.fixture
def pg_registry(outage_postgres, tmp_path):
    settings = RegistrySettings(
        home=tmp_path / "home",
        registry=fresh_database(outage_postgres),
        artifacts=(tmp_path / "artifacts").as_uri(),
    )
    with Registry.open(settings) as registry:
        yield registry, settings


@pytest.mark.postgres
def test_every_store_call_raises_one_error_while_postgres_is_down(
    pg_registry, outage_postgres, make_adapter
):
    registry, _ = pg_registry
    registry.register("support", make_adapter(), actor="t")
    outage_postgres.stop(mode="fast")  # every commit kept
    calls = {
        "resolve": lambda: registry.store.resolve("support@1"),
        "routing": registry.store.routing_snapshot,
        "revision": registry.store.revision,
        "list": registry.store.list_adapters,
        "promote": lambda: registry.store.promote("support", 1, actor="t"),
        "register": lambda: registry.register("support", make_adapter(), actor="t"),
    }
    for what, call in calls.items():
        with pytest.raises(RegistryUnavailableError, match="is unavailable: ") as caught:
            call()
        assert "\n" not in str(caught.value), what
    outage_postgres.resume()
    assert registry.store.resolve("support@1").number == 1  # the pool reconnects by itself


@pytest.mark.postgres
def test_the_cli_prints_one_line_when_postgres_is_down(pg_registry, outage_postgres, tmp_path):
    _, settings = pg_registry
    outage_postgres.stop(mode="fast")  # every commit kept
    for command in (["list"], ["show", "support@1"], ["gc", "--dry-run"]):
        result = registry_cli(*command, url=settings.database_url(), artifacts=tmp_path / "a")
        assert_one_line_error(result, contains="cannot open registry database")


def test_the_cli_prints_one_line_when_the_sqlite_file_is_unreadable(tmp_path, make_adapter):
    database = tmp_path / "registry.db"
    url, artifacts = f"sqlite:///{database}", tmp_path / "artifacts"
    settings = RegistrySettings(home=tmp_path, registry=url, artifacts=artifacts.as_uri())
    with Registry.open(settings) as registry:
        registry.register("support", make_adapter(), actor="t")
    # Overwrite the pages of the adapters table (the schema and alembic_version stay readable,
    # so the database opens and the failure comes mid-command).
    with sqlite3.connect(database) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'adapters'").fetchone()
    with database.open("r+b") as f:
        f.seek((root[0] - 1) * page_size)
        f.write(b"\xa5" * page_size)
    result = registry_cli("list", url=url, artifacts=artifacts)
    assert_one_line_error(result, contains="is unavailable: database disk image is malformed")
    assert "sqlite:///" in result.stderr


@pytest.mark.postgres
def test_the_admin_api_answers_503_while_postgres_is_down_and_recovers(
    pg_registry, outage_postgres, make_adapter, tmp_path
):
    registry, _ = pg_registry
    registry.register("support", make_adapter(), actor="t")
    engine, metrics = FakeEngine(), ServerMetrics(CollectorRegistry())
    local = LocalAdapters(engine, base_name="fake", adapters={}, metrics=metrics)
    app = create_app(
        engine=engine, resolver=local, metrics=metrics, registry=registry, admin_key=ADMIN_KEY
    )
    server = ServerThread(app).start(timeout=30)
    try:
        admin = httpx.Client(
            base_url=f"{server.url}/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert admin.get("/adapters").status_code == 200
        outage_postgres.stop(mode="fast")  # every commit kept
        requests = [
            admin.get("/adapters"),
            admin.get("/versions/support@1"),
            admin.post("/adapters/support/promote", json={"version": 1}),
            admin.get("/routing"),
        ]
        for response in requests:
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "service_unavailable_error"
            assert "registry database" in error["message"]
        outage_postgres.resume()
        assert admin.get("/versions/support@1").json()["ref"] == "support@1"
    finally:
        server.stop()
