"""Who may fine-tune, and the upload limit: HTTP-layer checks on a fake engine with a real
SQLite registry and the official client (no training, no real engine)."""

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


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    registry = Registry.open(RegistrySettings(home=tmp_path))
    engine, metrics = FakeEngine(), ServerMetrics(CollectorRegistry())
    app = create_app(
        engine=engine, resolver=LocalAdapters(engine, base_name="fake", adapters={}, metrics=metrics),
        metrics=metrics, api_keys=[INFERENCE], admin_key=ADMIN, registry=registry,
        fine_tuning=FineTuningSettings(home=tmp_path, fine_tuning_max_file_bytes=LIMIT),
    )  # fmt: skip
    running = ServerThread(app).start(timeout=30)
    running.wait_ready()
    yield running
    running.stop()
    registry.close()


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
