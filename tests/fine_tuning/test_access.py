"""Who may fine-tune, and the upload limits (a file over the inference body cap but within the file
limit is stored; one over the file limit is refused, declared or chunked): HTTP-layer checks on a
fake engine with a real SQLite registry and the official client (no training, no real engine)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from prometheus_client import CollectorRegistry

from registry.service import Registry
from registry.settings import RegistrySettings
from server.app import create_app
from server.engine_fake import FakeEngine
from server.fine_tuning.settings import FineTuningSettings
from server.metrics import ServerMetrics
from server.targets import LocalAdapters
from tests.support.servers import ServerThread

ADMIN, INFERENCE = "admin-secret", "inference-secret"
LIMIT = 2048


def serve(home: Path, limit: int) -> Iterator[ServerThread]:
    registry = Registry.open(RegistrySettings(home=home))
    engine, metrics = FakeEngine(), ServerMetrics(CollectorRegistry())
    app = create_app(
        engine=engine, resolver=LocalAdapters(engine, base_name="fake", adapters={}, metrics=metrics),
        metrics=metrics, api_keys=[INFERENCE], admin_key=ADMIN, registry=registry,
        fine_tuning=FineTuningSettings(home=home, fine_tuning_max_file_bytes=limit),
    )  # fmt: skip
    running = ServerThread(app).start(timeout=30)
    running.wait_ready()
    yield running
    running.stop()
    registry.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    yield from serve(tmp_path, LIMIT)


def client(server: ServerThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


ROW = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HI"}]}\n'


def test_an_inference_key_gets_403_and_no_key_401(server: ServerThread) -> None:
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client(server, INFERENCE).fine_tuning.jobs.list()
    assert denied.value.body["type"] == "permission_error"
    with pytest.raises(openai.PermissionDeniedError):
        client(server, INFERENCE).files.create(file=("a.jsonl", ROW), purpose="fine-tune")
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").files.list()
    admin = client(server, ADMIN)
    assert admin.fine_tuning.jobs.list().data == []
    assert admin.files.create(file=("a.jsonl", ROW), purpose="fine-tune").status == "processed"


def test_a_file_over_the_limit_is_refused_with_413(server: ServerThread) -> None:
    admin = client(server, ADMIN)
    with pytest.raises(openai.APIStatusError) as refused:
        admin.files.create(file=("big.jsonl", ROW * (LIMIT // len(ROW) + 1)), purpose="fine-tune")
    assert refused.value.status_code == 413
    assert admin.files.list().data == []
    small = admin.files.create(file=("ok.jsonl", ROW * (LIMIT // len(ROW))), purpose="fine-tune")
    assert small.bytes <= LIMIT


def test_a_chunked_upload_over_the_limit_is_cut_off_with_413(server: ServerThread) -> None:
    """No content-length to refuse up front: the body is counted as it streams in."""
    import httpx

    boundary = "loraplexboundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
            f'fine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="big.jsonl"\r\nContent-Type: application/octet-stream\r\n\r\n')  # fmt: skip

    def body():
        yield head.encode()
        for _ in range(200):  # 200 x 8 KiB: far past the limit and its multipart allowance
            yield ROW * (8192 // len(ROW))
        yield f"\r\n--{boundary}--\r\n".encode()

    reply = httpx.post(
        f"{server.url}/v1/files", content=body(), timeout=30,
        headers={"Authorization": f"Bearer {ADMIN}",
                 "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    assert reply.status_code == 413, reply.text
    assert reply.json()["error"]["message"].startswith("The request body is larger")
    assert client(server, ADMIN).files.list().data == []


def test_a_file_over_the_inference_body_cap_but_within_the_file_limit_is_stored(
    tmp_path: Path,
) -> None:
    from server.request_limits import DEFAULT_MAX_REQUEST_BYTES

    rows = b"".join(
        b'{"messages": [{"role": "user", "content": "q%d"}, {"role": "assistant", '
        b'"content": "%s"}]}\n' % (i, b"A" * 200)
        for i in range(DEFAULT_MAX_REQUEST_BYTES // 200 + 100)
    )  # fmt: skip
    assert DEFAULT_MAX_REQUEST_BYTES < len(rows) < 2 * DEFAULT_MAX_REQUEST_BYTES
    for running in serve(tmp_path, 2 * DEFAULT_MAX_REQUEST_BYTES):
        stored = client(running, ADMIN).files.create(file=("big.jsonl", rows), purpose="fine-tune")
        assert stored.bytes == len(rows)
        assert client(running, ADMIN).files.content(stored.id).read() == rows
