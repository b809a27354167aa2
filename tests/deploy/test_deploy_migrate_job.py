"""The migration Job and the compose `migrate` service run for real: their command, as a process,
with their environment, against a throwaway PostgreSQL database in place of the Secret's URL.
Run twice (a re-applied Job, two at once in a roll), the second changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.deploy.manifests import compose, containers, dockerfile_env, find, render
from tests.support.replicas import LORAPLEX, postgres_database

pytestmark = pytest.mark.postgres


def run_as_pod(args: list[str], env: dict[str, str], home) -> subprocess.CompletedProcess[str]:
    """`loraplex ARGS` (the image's entrypoint) with the pod's environment: the image's ENV, then
    the container's; paths the image has are replaced by the test's own."""
    pod_env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    pod_env.update({k: v for k, v in dockerfile_env().items() if k.startswith("LORAPLEX_")})
    pod_env.update(env)
    pod_env["LORAPLEX_HOME"] = str(home)
    return subprocess.run(
        [LORAPLEX, *args, "--json"], capture_output=True, text=True, timeout=120, env=pod_env
    )


def test_the_kubernetes_migration_job_migrates_once(postgres_server: str, tmp_path) -> None:  # noqa: F811
    job = find(render("gpu"), "Job", "loraplex-migrate")
    ((_, container),) = containers([job])
    env_names = {item["name"] for item in container["env"]}
    assert "LORAPLEX_REGISTRY" in env_names
    with postgres_database(postgres_server) as url:
        first = run_as_pod(container["args"], {"LORAPLEX_REGISTRY": url}, tmp_path)
        assert first.returncode == 0, first.stderr
        report = json.loads(first.stdout)
        assert (report["from"], report["to"], report["changed"]) == (None, report["head"], True)
        again = run_as_pod(container["args"], {"LORAPLEX_REGISTRY": url}, tmp_path)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["changed"] is False


def test_the_compose_migrate_service_migrates(postgres_server: str, tmp_path) -> None:  # noqa: F811
    service = compose()["services"]["migrate"]
    with postgres_database(postgres_server) as url:
        env = {**service["environment"], "LORAPLEX_REGISTRY": url}
        result = run_as_pod(service["command"], {k: str(v) for k, v in env.items()}, tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["status"] == "current"
