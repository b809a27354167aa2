"""`loraplex worker --once` as a process: it claims a queued job from the database the flags
name, validates its files and fails it with their line-numbered problems (no training)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from registry.fine_tuning import FineTuningStore
from registry.service import Registry
from registry.settings import RegistrySettings
from server.fine_tuning.files import store_bytes

BAD = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HI"}]}\n{oops\n'


def test_worker_once_fails_a_job_on_an_invalid_file(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    settings = RegistrySettings(home=tmp_path)
    with Registry.open(settings) as registry:
        jobs = FineTuningStore(registry.store)
        sha256, blob = store_bytes(registry.artifacts, BAD)
        upload = jobs.add_file(filename="bad.jsonl", purpose="fine-tune", bytes=len(BAD),
                               sha256=sha256, blob_sha256=blob, status="error")  # fmt: skip
        job = jobs.create_job(model="smollm2", training_file=upload.id, suffix="never", seed=0,
                              method={"type": "supervised",
                                      "supervised": {"hyperparameters": {}}})  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "loraplex.cli", "worker", "--once", "--home", str(tmp_path),
             "--registry", settings.database_url(), "--artifacts", settings.artifacts_url(),
             "--model", str(embedded_model_dir)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        failed = jobs.get_job(job.id)
    assert failed.status == "failed", failed
    assert failed.error["code"] == "invalid_training_file"
    assert "line 2" in failed.error["message"]
    assert failed.worker is not None and failed.finished_at is not None


def test_the_servers_settings_configure_its_in_process_worker(
    tmp_path: Path, monkeypatch, embedded_model_dir: Path
) -> None:
    """`loraplex serve`'s settings are the fine-tuning settings too: its --home and the
    LORAPLEX_FINE_TUNING_* variables reach the worker it runs."""
    from server.fine_tuning.worker import in_process_worker
    from server.settings import ServeSettings

    monkeypatch.setenv("LORAPLEX_FINE_TUNING_POLL_SECONDS", "7.5")
    monkeypatch.setenv("LORAPLEX_FINE_TUNING_GATE", "false")
    settings = ServeSettings(home=tmp_path, base_model_dir=embedded_model_dir)
    with Registry.open(settings) as registry:
        worker = in_process_worker(registry, settings)
        assert worker is not None
        assert (worker.poll_seconds, worker.gate) == (7.5, False)
        assert worker.runs_dir.is_relative_to(tmp_path)
    monkeypatch.setenv("LORAPLEX_FINE_TUNING_WORKER", "false")
    with Registry.open(ServeSettings(home=tmp_path)) as registry:
        assert in_process_worker(registry, ServeSettings(home=tmp_path)) is None
