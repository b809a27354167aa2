"""Store-level lifecycle of a job (no training): pause and resume, cancel of a paused job, the
newest uploaded checkpoint a takeover resumes from, and registry gc keeping the blobs of
fine-tuning files and of live jobs' checkpoints."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from registry.fine_tuning import FineTuningStateError, FineTuningStore
from registry.gc import sweep_orphans
from registry.service import Registry
from registry.settings import RegistrySettings
from registry.store import RegistryStore
from server.fine_tuning.files import store_bytes

METHOD = {"type": "supervised", "supervised": {"hyperparameters": {}}}


def new_job(jobs: FineTuningStore) -> str:
    return jobs.create_job(model="smollm2", training_file="file-x", suffix="q", seed=0,
                           method=METHOD).id  # fmt: skip


def test_pause_resume_and_cancel_follow_the_job_status(database_url: str) -> None:
    store = RegistryStore.open(database_url)
    jobs = FineTuningStore(store)
    waiting, running = new_job(jobs), new_job(jobs)
    assert jobs.request_pause(waiting).status == "paused"  # no worker holds it: at once
    assert jobs.claim("w").id == running  # a paused job is not claimed
    assert jobs.claim("w") is None
    flagged = jobs.request_pause(running)
    assert (flagged.status, flagged.pause_requested) == ("validating_files", True)
    assert jobs.heartbeat(running, "w") is True  # its worker learns it and stops
    jobs.set_status(running, "paused", worker=None, pause_requested=False)
    resumed = jobs.request_resume(running)
    assert (resumed.status, resumed.worker, resumed.pause_requested) == ("queued", None, False)
    assert jobs.claim("w2").id == running
    with pytest.raises(FineTuningStateError):
        jobs.request_resume(running)  # running, not paused
    assert jobs.request_cancel(waiting).status == "cancelled"  # paused: ended at once
    with pytest.raises(FineTuningStateError):
        jobs.request_pause(waiting)  # finished
    store.close()


def test_the_newest_uploaded_checkpoint_is_the_one_a_takeover_resumes_from(
    database_url: str,
) -> None:
    store = RegistryStore.open(database_url)
    jobs = FineTuningStore(store)
    job = new_job(jobs)
    jobs.add_checkpoint(job, 4, {"step": 4}, blob_sha256="a" * 64)
    jobs.add_checkpoint(job, 8, {"step": 8})  # not uploaded: not resumable
    jobs.add_checkpoint(job, 2, {"step": 2}, blob_sha256="b" * 64)  # older than the newest
    row = jobs.get_job(job)
    assert (row.checkpoint_step, row.checkpoint_sha256) == (4, "a" * 64)
    assert jobs.claim("w", stale_seconds=0.0).id == job
    taken = jobs.claim("w2", stale_seconds=0.0)  # w is silent (stale at once here)
    assert taken is not None and taken.worker == "w2" and taken.checkpoint_step == 4
    store.close()


def _blob(registry: Registry, content: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "checkpoint.bin").write_bytes(content)
        return registry.artifacts.upload_folder(Path(tmp)).sha256


def test_registry_gc_keeps_file_blobs_and_live_jobs_checkpoints(tmp_path: Path) -> None:
    with Registry.open(RegistrySettings(home=tmp_path)) as registry:
        jobs = FineTuningStore(registry.store)
        _, file_blob = store_bytes(registry.artifacts, b'{"messages": []}\n')
        jobs.add_file(filename="t.jsonl", purpose="fine-tune", bytes=17, sha256="0" * 64,
                      blob_sha256=file_blob, status="processed")  # fmt: skip
        live, done = new_job(jobs), new_job(jobs)
        live_blob, done_blob = _blob(registry, b"live"), _blob(registry, b"done")
        orphan = _blob(registry, b"orphan")
        jobs.add_checkpoint(live, 4, {"step": 4}, blob_sha256=live_blob)
        jobs.add_checkpoint(done, 4, {"step": 4}, blob_sha256=done_blob)
        jobs.set_status(done, "succeeded")
        report = sweep_orphans(registry.store, registry.artifacts, grace_seconds=0)
        removed = {blob.sha256 for blob in report.removed}
        assert removed == {done_blob, orphan}
        assert registry.artifacts.exists(file_blob) and registry.artifacts.exists(live_blob)
