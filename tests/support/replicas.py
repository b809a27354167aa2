"""Several `loraplex serve` processes acting as one deployment: one PostgreSQL database, one S3
API (moto's server), one disk cache and data dir per replica (as per pod), each on its own port.

`replica_pair` starts two real-engine servers at once (each ~1 min on 2 cores) and, when done,
kills every process of their sessions (engine core and worker included).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import psutil
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from tests.support.servers import free_port, wait_for

LORAPLEX = str(Path(sys.executable).with_name("loraplex"))
ADMIN_KEY = "replica-admin-key"


class Replica:
    """One `loraplex serve` process in its own process group, its console in a file."""

    def __init__(self, name: str, process: subprocess.Popen, port: int, log: Path):
        self.name, self.process, self.log = name, process, log
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 600) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"replica {self.name} exited early:\n{self.text()[-4000:]}")
            try:
                return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=timeout, every=0.5)

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        headers = {"authorization": f"Bearer {ADMIN_KEY}", "x-loraplex-actor": self.name}
        return httpx.request(
            method, f"{self.url}/admin{path}", headers=headers, timeout=30, **kwargs
        )

    def metric(self, name: str, labels: dict[str, str]) -> float:
        """The sum of `name`'s samples whose labels include `labels`, from GET /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def kill(self) -> None:
        """SIGKILL the server's process group, as a crash or an OOM kill of the server does. The
        engine processes run in process groups of their own (server/spawned.py), so they are
        not signalled: they must notice that their server is gone."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def leftovers(self) -> list[psutil.Process]:
        """Live processes of this replica's session (the server and everything it started)."""
        found = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == self.process.pid and (
                    process.status() != psutil.STATUS_ZOMBIE
                ):
                    found.append(process)
            except (OSError, psutil.Error):
                continue
        return found

    def reap(self) -> None:
        """SIGKILL every process left in this replica's session, so no test run leaks one."""
        self.kill()
        for process in self.leftovers():
            try:
                process.kill()
            except psutil.Error:
                continue


def replica_env(home: Path, *, database_url: str, artifacts_url: str, s3: dict[str, str]) -> dict:
    env = {
        **os.environ,
        **s3,
        "LORAPLEX_HOME": str(home),
        "LORAPLEX_REGISTRY": database_url,
        "LORAPLEX_ARTIFACTS": artifacts_url,
        "LORAPLEX_ADMIN_KEY": ADMIN_KEY,
        "LORAPLEX_KV_CACHE_GIB": "1",  # two engines share 2 cores and the suite's memory
        "LORAPLEX_MAX_NUM_SEQS": "16",
        "LORAPLEX_AB_ANALYSIS_SECONDS": "1",
    }
    return env


@contextmanager
def replica_pair(
    root: Path, *, model_dir: Path, database_url: str, artifacts_url: str, s3: dict[str, str]
) -> Iterator[list[Replica]]:
    """Two replicas "a" and "b", started together, both ready."""
    replicas: list[Replica] = []
    try:
        for name in ("a", "b"):
            port = free_port()
            log = root / f"serve-{name}.log"
            env = replica_env(
                root / name, database_url=database_url, artifacts_url=artifacts_url, s3=s3
            )
            cmd = [LORAPLEX, "serve", "--model", str(model_dir), "--port", str(port),
                   "--max-model-len", "512"]  # fmt: skip
            with log.open("w") as sink:
                process = subprocess.Popen(
                    cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
                )
            replicas.append(Replica(name, process, port, log))
        for replica in replicas:
            replica.wait_ready()
        yield replicas
    finally:
        for replica in replicas:
            replica.reap()


@contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    """A fresh database on `server_url` (a role that may CREATE DATABASE), dropped afterwards."""
    import psycopg

    admin = make_url(server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"loraplex_replicas_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
