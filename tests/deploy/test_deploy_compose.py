"""deploy/compose.yaml without a Docker engine: it validates against the Compose Specification's
JSON schema (vendored in tests/deploy/schemas, the schema `docker compose config` uses), and its
references hold: services, volumes, files, the image, credentials and URLs that must agree, and
settings the server really reads with values it accepts.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
from sqlalchemy.engine import make_url

from tests.deploy.manifests import (
    DEPLOY,
    compose,
    compose_environment,
    dockerfile_env,
    find,
    parse_loraplex_command,
    render,
    settings_from,
)

SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"


def test_compose_file_validates_against_the_compose_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


def test_schema_rejects_a_misspelt_key() -> None:
    """The vendored schema is strict enough to catch what `docker compose config` would."""
    broken = compose()
    broken["services"]["loraplex"]["depend_on"] = ["postgres"]
    assert not jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).is_valid(broken)


def test_references_resolve() -> None:
    stack = compose()
    services = stack["services"]
    named_volumes = set(stack.get("volumes", {}))
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: no {source} beside compose.yaml"
            else:
                assert source in named_volumes, f"{name}: volume {source} is not declared"
        if build := service.get("build"):
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), f"{name}: no Dockerfile"
            dockerfile = (context / build["dockerfile"]).read_text()
            assert f" AS {build['target']}\n" in dockerfile, f"{name}: no target {build['target']}"
    # one-shots the server waits for must be waited for as completed, not started
    waits = services["loraplex"]["depends_on"]
    assert waits["minio-init"]["condition"] == "service_completed_successfully"
    assert waits["migrate"]["condition"] == "service_completed_successfully"
    assert waits["postgres"]["condition"] == "service_healthy"


def test_loraplex_image_matches_the_cpu_overlay_and_commands_parse() -> None:
    services = compose()["services"]
    cpu_images = {
        c["image"]
        for c in find(render("cpu"), "Deployment")["spec"]["template"]["spec"]["containers"]
    }
    for name in ("loraplex", "migrate"):
        assert {services[name]["image"]} == cpu_images, name
        assert services[name]["build"]["target"] == "cpu"
        parse_loraplex_command(services[name]["command"])
    assert parse_loraplex_command(services["migrate"]["command"])[0] == ["registry", "migrate"]
    assert parse_loraplex_command(services["loraplex"]["command"])[0] == ["serve"]


@pytest.mark.parametrize("name", ["loraplex", "migrate"])
def test_settings_are_real_and_agree_with_the_services(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose()["services"]
    env = compose_environment(services[name])
    unknown = [k for k in env if k.startswith("LORAPLEX_") and k.lower()[9:] not in _fields()]
    assert not unknown, f"{name}: not settings of loraplex: {unknown}"
    resolved = {k: _default(v) for k, v in env.items()}
    settings = settings_from({**dockerfile_env(), **resolved}, monkeypatch)

    database = make_url(settings.database_url())
    assert database.drivername == "postgresql+psycopg"
    postgres = services[database.host]["environment"]
    assert (database.username, database.password, database.database) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        postgres["POSTGRES_DB"],
    )
    assert database.port == 5432
    if name == "migrate":
        return

    assert f"{settings.port}:{settings.port}" in services[name]["ports"]
    bucket = urlparse(settings.artifacts_url())
    assert bucket.scheme == "s3"
    endpoint = urlparse(env["AWS_ENDPOINT_URL"])
    minio = services[endpoint.hostname]
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        minio["environment"]["MINIO_ROOT_USER"],
        minio["environment"]["MINIO_ROOT_PASSWORD"],
    )
    (init,) = services["minio-init"]["command"]
    words = shlex.split(init)
    alias = words[words.index("alias") + 3 :][:3]  # mc alias set NAME URL KEY SECRET
    assert alias == [
        env["AWS_ENDPOINT_URL"],
        env["AWS_ACCESS_KEY_ID"],
        env["AWS_SECRET_ACCESS_KEY"],
    ]
    assert f"local/{bucket.hostname}" in words, f"minio-init does not create {bucket.hostname}"
    grace = services[name]["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > settings.drain_seconds + 5


def _fields() -> set[str]:
    from server.settings import ServeSettings

    return set(ServeSettings.model_fields)


def _default(value: str) -> str:
    """compose's ${VAR:-default} interpolation, with VAR unset."""
    if value.startswith("${") and ":-" in value and value.endswith("}"):
        return value[2:-1].split(":-", 1)[1]
    return value
