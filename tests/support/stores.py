"""Stores the suite's tests share: a throwaway PostgreSQL server (or LORAPLEX_TEST_POSTGRES_URL)
and moto's S3 server over HTTP. Their fixtures are registered once, by tests/conftest.py, so every
test folder gets the same session-wide server instead of one per importing module."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.support.servers import free_port

# --- PostgreSQL ------------------------------------------------------------------------------


def _postgres_bindir() -> Path | None:
    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        if Path(initdb).with_name("pg_ctl").exists():
            return Path(initdb).parent
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


class _Cluster:
    """initdb + pg_ctl on a temp folder; as root, run as the `postgres` user (the server refuses
    to run as root)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="loraplex-pg-"))
        self.data, self.log, self.port = self.root / "data", self.root / "log", free_port()
        self.started = False
        if self.as_root:
            shutil.chown(self.root, user="postgres", group="postgres")

    def run(self, tool: str, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        try:
            command = [*prefix, str(self.bindir / tool), "-D", str(self.data), *args]
            subprocess.run(command, check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError as e:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"throwaway PostgreSQL: {tool} failed: {e.stderr!r} {log}") from e

    def start(self) -> str:
        self.run("initdb", "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        self.run("pg_ctl", "-l", str(self.log), "-o", self._options(), "-w", "-t", "60", "start")
        self.started = True
        return self.url

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _options(self) -> str:
        return (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=200"
        )

    def stop(self, *, mode: str = "immediate") -> None:
        """Stop the server; "immediate" may lose recent commits (fsync is off), "fast" not."""
        self.run("pg_ctl", "-m", mode, "-w", "stop")
        self.started = False

    def resume(self) -> None:
        """Start a stopped cluster again (same data, same port)."""
        self.run("pg_ctl", "-l", str(self.log), "-o", self._options(), "-w", "-t", "60", "start")
        self.started = True


@contextmanager
def throwaway_postgres(bindir: Path) -> Iterator[str]:
    """A fresh cluster on 127.0.0.1 and a free port, stopped and deleted afterwards."""
    cluster = _Cluster(bindir)
    try:
        yield cluster.start()
    finally:
        if cluster.started:
            cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def _require_postgres_binaries() -> Path:
    bindir = _postgres_bindir()
    if bindir is None:
        message = (
            "PostgreSQL tests need LORAPLEX_TEST_POSTGRES_URL or the server binaries "
            "(apt-get install postgresql)"
        )
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message)
        pytest.skip(message)
    return bindir


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL URL whose role may create databases."""
    if url := os.environ.get("LORAPLEX_TEST_POSTGRES_URL"):
        yield url
        return
    with throwaway_postgres(_require_postgres_binaries()) as url:
        yield url


def _admin_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped afterwards."""
    import psycopg

    name = f"loraplex_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_dsn(postgres_server), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(postgres_server).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(_admin_dsn(postgres_server), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh registry database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("postgres_url")


# --- S3 (moto's server over HTTP) -----------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """`s3://BUCKET/adapters` on a new bucket; boto3 finds moto through AWS_ENDPOINT_URL."""
    import boto3

    for key, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    bucket = f"loraplex-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/adapters"
