"""A job's lifecycle across worker processes (`loraplex worker`, as deployments run them), with
the official client over real HTTP (a fake-engine server with a real registry: no chat here):
per-step metrics events as training goes, a worker SIGKILLed after a checkpoint and its job
resumed from that checkpoint by another worker and registered once, pause / resume, and cancel
of a paused job. Run under the engine lock (it trains on the CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from prometheus_client import CollectorRegistry

from registry.fine_tuning import FineTuningStore
from registry.service import Registry
from registry.settings import RegistrySettings
from server.app import create_app
from server.engine_fake import FakeEngine
from server.fine_tuning.settings import FineTuningSettings
from server.metrics import ServerMetrics
from server.targets import LocalAdapters
from tests.fine_tuning.test_jobs import chat_rows, wait_status
from tests.support.adapters import TRAINING_PAIRS
from tests.support.fixtures import ADMIN_KEY, BASE_NAME
from tests.support.servers import ServerThread

STALE_S = 3  # the second worker takes a job over after 3 s without a heartbeat
# 32 rows, batch 8: 4 steps an epoch, evaluated and checkpointed at the end of each.
EPOCH_STEPS = 4


class Setup:
    def __init__(self, home: Path, registry: Registry, server: ServerThread) -> None:
        self.home, self.registry, self.server = home, registry, server
        self.jobs = FineTuningStore(registry.store)
        self.client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60
        )
        self.logs: list[Path] = []

    def worker(self, model_dir: Path, label: str) -> subprocess.Popen:
        """`loraplex worker` as its own process on this registry's database and store."""
        log = self.home / f"{label}.log"
        self.logs.append(log)
        env = os.environ | {"LORAPLEX_FINE_TUNING_STALE_SECONDS": str(STALE_S),
                            "LORAPLEX_FINE_TUNING_POLL_SECONDS": "0.2"}  # fmt: skip
        with log.open("wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "loraplex.cli", "worker", "--no-gate",
                 "--home", str(self.home / label), "--model", str(model_dir),
                 "--registry", self.registry.store.engine.url.render_as_string(False),
                 "--artifacts", self.registry.artifacts.url],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip

    def files(self) -> tuple[str, str]:
        train = self.client.files.create(
            file=("train.jsonl", chat_rows(TRAINING_PAIRS[:32])), purpose="fine-tune"
        )
        val = self.client.files.create(
            file=("val.jsonl", chat_rows(TRAINING_PAIRS[32:40])), purpose="fine-tune"
        )
        return train.id, val.id

    def create(self, suffix: str, epochs: int) -> str:
        train, val = self.files()
        return self.client.fine_tuning.jobs.create(
            model=BASE_NAME, training_file=train, validation_file=val, suffix=suffix, seed=3,
            method={"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": epochs, "batch_size": 8, "learning_rate_multiplier": 5}}},
        ).id  # fmt: skip

    def wait_checkpoint(self, job_id: str, timeout: float = 600) -> list[tuple[set, set]]:
        """Poll until the job has an uploaded checkpoint; each poll's (metrics steps seen,
        checkpoint steps listed) over HTTP."""
        seen, deadline = [], time.monotonic() + timeout
        while self.jobs.get_job(job_id).checkpoint_sha256 is None:
            events = self.client.fine_tuning.jobs.list_events(job_id, limit=100).data
            checkpoints = self.client.fine_tuning.jobs.checkpoints.list(job_id).data
            seen.append(({e.data["step"] for e in events if e.type == "metrics"},
                         {c.step_number for c in checkpoints}))  # fmt: skip
            assert time.monotonic() < deadline, f"no checkpoint uploaded:\n{self.tail()}"
            assert self.jobs.get_job(job_id).status not in ("failed", "cancelled"), self.tail()
            time.sleep(0.2)
        return seen

    def events(self, job_id: str) -> list:
        return list(reversed(self.client.fine_tuning.jobs.list_events(job_id, limit=1000).data))

    def tail(self) -> str:
        return "\n".join(log.read_text(errors="replace")[-3000:] for log in self.logs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    home = tmp_path_factory.mktemp("ft-lifecycle")
    registry = Registry.open(RegistrySettings(home=home))
    engine, metrics = FakeEngine(), ServerMetrics(CollectorRegistry())
    local = LocalAdapters(engine, base_name=BASE_NAME, adapters={}, metrics=metrics)
    app = create_app(
        engine=engine, resolver=local, metrics=metrics, registry=registry, admin_key=ADMIN_KEY,
        fine_tuning=FineTuningSettings(home=home, fine_tuning_worker=False),
    )  # fmt: skip
    server = ServerThread(app).start(timeout=30)
    server.wait_ready()
    yield Setup(home, registry, server)
    server.stop()
    registry.close()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_dpo_jobs_need_preference_files_and_ft_models_must_exist(setup: Setup) -> None:
    client = setup.client
    chat, _ = setup.files()
    pairs = [{"prompt": q, "chosen": a.upper(), "rejected": a} for q, a in TRAINING_PAIRS[:8]]
    preference = client.files.create(
        file=("pairs.jsonl", "".join(json.dumps(p) + "\n" for p in pairs).encode()),
        purpose="fine-tune",
    ).id
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}}
    with pytest.raises(openai.BadRequestError) as wrong:
        client.fine_tuning.jobs.create(model=BASE_NAME, training_file=chat, suffix="d", method=dpo)
    assert wrong.value.body["param"] == "training_file"
    assert "preference JSONL" in wrong.value.body["message"]
    with pytest.raises(openai.BadRequestError) as other:
        client.fine_tuning.jobs.create(model=BASE_NAME, training_file=preference, suffix="d")
    assert other.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as beta:
        client.fine_tuning.jobs.create(
            model=BASE_NAME, training_file=preference, suffix="d",
            method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}},
        )  # fmt: skip
    assert beta.value.body["param"] == "hyperparameters.beta"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.fine_tuning.jobs.create(
            model=f"ft:{BASE_NAME}:loraplex:nothing:00000000", training_file=chat, suffix="d"
        )
    assert unknown.value.body["param"] == "model"
    job = client.fine_tuning.jobs.create(
        model=BASE_NAME, training_file=preference, suffix="d", method=dpo
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # before any worker


def test_a_killed_workers_job_resumes_from_its_checkpoint_on_another_worker(
    setup: Setup, embedded_model_dir: Path
) -> None:
    job_id = setup.create("resumed", epochs=4)  # 16 steps
    first = setup.worker(embedded_model_dir, "first")
    try:
        seen = setup.wait_checkpoint(job_id)
        first.send_signal(signal.SIGKILL)  # no goodbye: its heartbeat just stops
        first.wait(30)
    finally:
        first.kill()
    killed_at = setup.jobs.get_job(job_id).checkpoint_step
    assert killed_at and killed_at % EPOCH_STEPS == 0
    # Steps were reported while they ran, before any checkpoint covered them.
    assert any(steps and not ckpts for steps, ckpts in seen), seen
    second = setup.worker(embedded_model_dir, "second")
    try:
        job = wait_status(setup.client, job_id, {"succeeded", "failed", "cancelled"})
    finally:
        stop(second)
    assert job.status == "succeeded", (job.error, setup.tail())
    assert job.fine_tuned_model == f"ft:{BASE_NAME}:loraplex:resumed:{job_id[-8:]}"
    assert setup.jobs.get_job(job_id).result_ref == "resumed@1"
    assert setup.registry.store.get_adapter("resumed").versions == (1,)  # registered once
    events = setup.events(job_id)
    messages = [e.message for e in events if e.type == "message"]
    resumed = f"Fine-tuning job resumed from the checkpoint at step {killed_at}"
    assert resumed in messages, messages
    starts = [e.data["step"] for e in events if e.message.startswith("Training ")
              and e.data and e.data.get("event") == "start"]  # fmt: skip
    assert starts[0] == 0 and starts[-1] == killed_at > 0, starts
    metrics = [e.data for e in events if e.type == "metrics"]
    assert {m["step"] for m in metrics} == set(range(1, 17))
    assert all(m["total_steps"] == 16 and m["train_loss"] > 0 for m in metrics)
    evaluated = {m["step"] for m in metrics if "valid_loss" in m}
    assert evaluated >= set(range(EPOCH_STEPS, 17, EPOCH_STEPS)), evaluated
    checkpoints = setup.client.fine_tuning.jobs.checkpoints.list(job_id, limit=100).data
    assert {c.step_number for c in checkpoints} == set(range(EPOCH_STEPS, 17, EPOCH_STEPS))
    [result] = job.result_files  # the whole run's steps, both workers' parts
    lines = setup.client.files.content(result).read().decode().splitlines()
    assert lines[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(1, 17))


def test_pause_frees_the_worker_resume_continues_and_a_paused_job_can_be_cancelled(
    setup: Setup, embedded_model_dir: Path
) -> None:
    client = setup.client
    job_id = setup.create("paused", epochs=3)  # 12 steps
    worker = setup.worker(embedded_model_dir, "pausing")
    try:
        wait_status(client, job_id, {"running"}, timeout=120)
        waiting = setup.create("never", epochs=1)  # queued behind the running one
        assert client.fine_tuning.jobs.pause(waiting).status == "paused"  # no worker: at once
        assert client.fine_tuning.jobs.cancel(waiting).status == "cancelled"
        with pytest.raises(openai.BadRequestError):
            client.fine_tuning.jobs.resume(waiting)
        setup.wait_checkpoint(job_id)
        client.fine_tuning.jobs.pause(job_id)
        paused = wait_status(client, job_id, {"paused", "succeeded", "failed"}, timeout=60)
        assert paused.status == "paused", setup.tail()
        row = setup.jobs.get_job(job_id)
        assert row.worker is None and row.checkpoint_step, row
        at = row.checkpoint_step
        time.sleep(2)  # the freed worker polls, and leaves the paused job alone
        assert client.fine_tuning.jobs.retrieve(job_id).status == "paused"
        assert client.fine_tuning.jobs.resume(job_id).status == "queued"
        done = wait_status(client, job_id, {"succeeded", "failed", "cancelled"})
    finally:
        stop(worker)
    assert done.status == "succeeded", (done.error, setup.tail())
    assert setup.registry.store.get_adapter("paused").versions == (1,)
    messages = [e.message for e in setup.events(job_id) if e.type == "message"]
    assert f"Fine-tuning job resumed from the checkpoint at step {at}" in messages, messages
    assert any(m.startswith("Fine-tuning job paused") for m in messages), messages
    assert client.fine_tuning.jobs.retrieve(waiting).status == "cancelled"
