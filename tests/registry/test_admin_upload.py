"""POST /admin/adapters/NAME/versions over real HTTP: the body is streamed to disk under a hard
byte cap (chunked bodies included), decompressed and unpacked with caps off the event loop,
crafted adapters end as listed problems (400), and the actor header is bounded. Every refusal
is OpenAI-shaped."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

import server.admin
from registry.archive import pack_folder
from server.app import create_app
from server.engine_fake import FakeEngine
from server.metrics import ServerMetrics
from server.targets import LocalAdapters
from tests.support.servers import ServerThread

ADMIN_KEY = "upload-admin-key"


@pytest.fixture
def admin(registry) -> Iterator[httpx.Client]:
    """An httpx client for /admin of a fake-engine server on the test's registry."""
    engine, metrics = FakeEngine(), ServerMetrics(CollectorRegistry())
    local = LocalAdapters(engine, base_name="fake", adapters={}, metrics=metrics)
    app = create_app(
        engine=engine, resolver=local, metrics=metrics, registry=registry, admin_key=ADMIN_KEY
    )
    server = ServerThread(app).start(timeout=30)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=f"{server.url}/admin", headers=headers, timeout=60) as client:
        yield client
    server.stop()


def tar_of(folder: Path, tmp_path: Path) -> bytes:
    return pack_folder(folder, tmp_path / f"{folder.name}.tar").path.read_bytes()


def assert_openai_error(response: httpx.Response, status: int, *, contains: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert contains in error["message"], error
    return error


def test_an_upload_registers_tar_or_gzip_with_its_actor(admin, registry, make_adapter, tmp_path):
    body = tar_of(make_adapter(), tmp_path)
    plain = admin.post("/adapters/support/versions", content=body)
    assert plain.status_code == 201 and plain.json()["created_by"] == "admin-api"
    zipped = gzip.compress(tar_of(make_adapter(), tmp_path))
    named = admin.post(
        "/adapters/support/versions?tag=dataset=t",
        content=zipped,
        headers={"x-loraplex-actor": "José Lima".encode()},  # UTF-8 bytes
    )
    assert named.status_code == 201, named.text
    assert (named.json()["ref"], named.json()["created_by"]) == ("support@2", "José Lima")


@pytest.mark.parametrize(
    "actor, expected",
    [("a" * 129, 400), ("ana\tlima", 400), ("a" * 128, 201)],
    ids=["too-long", "not-printable", "at-the-limit"],
)
def test_the_actor_header_is_bounded(admin, make_adapter, tmp_path, actor, expected):
    response = admin.post(
        "/adapters/support/versions",
        content=tar_of(make_adapter(), tmp_path),
        headers={"x-loraplex-actor": actor},
    )
    if expected == 201:
        assert response.status_code == 201 and response.json()["created_by"] == actor
    else:
        error = assert_openai_error(response, 400, contains="at most 128 printable characters")
        assert error["param"] == "x-loraplex-actor"


def test_a_chunked_upload_is_cut_off_at_the_cap(admin, registry, monkeypatch):
    monkeypatch.setattr(server.admin, "MAX_UPLOAD_BYTES", 64 * 1024)
    sent = []

    def chunks():  # no content-length: httpx sends this with Transfer-Encoding: chunked
        for _ in range(64):
            sent.append(16 * 1024)
            yield b"\0" * (16 * 1024)

    response = admin.post("/adapters/support/versions", content=chunks())
    assert_openai_error(response, 413, contains="larger than this server accepts (65536 bytes)")
    assert response.json()["error"]["code"] == "request_too_large"
    assert registry.store.list_adapters() == []


def test_a_declared_length_above_the_cap_is_refused_before_reading(admin, monkeypatch):
    monkeypatch.setattr(server.admin, "MAX_UPLOAD_BYTES", 1024)
    response = admin.post("/adapters/support/versions", content=b"\0" * 4096)
    assert_openai_error(response, 413, contains="(1024 bytes)")


def test_a_gzip_bomb_is_refused_with_413(admin, registry, monkeypatch):
    monkeypatch.setattr(registry, "max_adapter_bytes", 1024**2)  # cap: 1 MiB + 16 MiB of tar
    bomb = gzip.compress(b"\0" * (64 * 1024**2), compresslevel=9)
    assert len(bomb) < 100 * 1024
    response = admin.post("/adapters/support/versions", content=bomb)
    assert_openai_error(response, 413, contains="decompresses to more than")


def test_an_archive_with_too_many_entries_is_refused(admin, registry, make_adapter, tmp_path):
    folder = make_adapter()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
        for i in range(1000):
            tar.addfile(tarfile.TarInfo(f"notes/{i}.txt"), io.BytesIO(b""))
    response = admin.post("/adapters/support/versions", content=buffer.getvalue())
    assert_openai_error(response, 400, contains="more than 1000 entries")
    assert registry.store.list_adapters() == []


@pytest.mark.parametrize(
    "config, weights_header, expected",
    [
        ({"lora_alpha": "abc"}, None, "lora_alpha must be a positive number, got 'abc'"),
        ({"r": -1}, None, "r must be a positive integer, got -1"),
        ({"target_modules": 7}, None, "target_modules must be a string or a list of strings"),
        ({}, b"[1, 2]", "header is JSON but not an object"),
    ],
    ids=["alpha-abc", "rank-negative", "targets-a-number", "header-an-array"],
)
def test_crafted_adapters_are_listed_problems_not_500s(
    admin, make_adapter, tmp_path, config, weights_header, expected
):
    folder = make_adapter(config=config)
    if weights_header is not None:
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(len(weights_header).to_bytes(8, "little") + weights_header)
    response = admin.post("/adapters/support/versions", content=tar_of(folder, tmp_path))
    error = assert_openai_error(response, 400, contains=expected)
    assert error["message"].startswith("support rejected (1 problem): ")


def test_a_bad_name_is_refused_before_the_body_is_read(admin, monkeypatch):
    monkeypatch.setattr(server.admin, "MAX_UPLOAD_BYTES", 1)  # a read body would be a 413
    response = admin.post("/adapters/bad!name/versions", content=b"\0" * 1024)
    assert_openai_error(response, 400, contains="invalid adapter name")
    empty = admin.post("/adapters/support/versions", content=b"")
    assert_openai_error(empty, 400, contains="Send the adapter folder as a tar archive")
    assert json.loads(empty.text)["error"]["type"] == "invalid_request_error"
