"""Store-level lifecycle of a job (no training): pause and resume, cancel of a paused job, the
newest uploaded checkpoint a takeover resumes from, checkpoint model ids resolving to their
uploaded checkpoints, and registry gc keeping the blobs of fine-tuning files and of the
checkpoints still resumable or callable."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from registry.fine_tuning import (
    FineTuningNotFoundError,
    FineTuningStateError,
    FineTuningStore,
    checkpoint_model_id,
    is_checkpoint_model,
    resolve_checkpoint,
)
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


def test_a_checkpoint_model_id_resolves_to_its_uploaded_checkpoint(database_url: str) -> None:
    store = RegistryStore.open(database_url)
    jobs = FineTuningStore(store)
    job_id, other_id = new_job(jobs), new_job(jobs)
    jobs.add_checkpoint(job_id, 4, {"step": 4}, blob_sha256="a" * 64)
    jobs.add_checkpoint(job_id, 8, {"step": 8})  # listed, never uploaded: nothing to serve
    jobs.add_checkpoint(other_id, 4, {"step": 4}, blob_sha256="b" * 64)
    job, other = jobs.get_job(job_id), jobs.get_job(other_id)
    model = checkpoint_model_id(job, 4)
    assert is_checkpoint_model(model) and model.endswith(f"{job_id[-8:]}:ckpt-step-4")
    found = resolve_checkpoint(store, model)
    assert (found.sha256, found.step, found.job_id, found.ref) == ("a" * 64, 4, job_id, model)
    assert found.adapter_path == "checkpoints/checkpoint-4"
    assert resolve_checkpoint(store, checkpoint_model_id(other, 4)).sha256 == "b" * 64
    for missing in (checkpoint_model_id(job, 8), checkpoint_model_id(job, 5),
                    model.replace(job_id[-8:], "00000000")):  # fmt: skip
        with pytest.raises(FineTuningNotFoundError):
            resolve_checkpoint(store, missing)
    jobs.request_cancel(other_id)  # a dropped job's checkpoints are not served
    with pytest.raises(FineTuningNotFoundError):
        resolve_checkpoint(store, checkpoint_model_id(other, 4))
    for not_one in ("ft:smollm2:loraplex:q:abcdefgh", "shout@1:ckpt-step-4",
                    "ft:smollm2:loraplex:q:abcdefgh:ckpt-step-x"):  # fmt: skip
        assert not is_checkpoint_model(not_one)
    store.close()


def _blob(registry: Registry, content: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "checkpoint.bin").write_bytes(content)
        return registry.artifacts.upload_folder(Path(tmp)).sha256


def test_registry_gc_keeps_file_blobs_and_checkpoints_of_live_and_succeeded_jobs(
    tmp_path: Path,
) -> None:
    with Registry.open(RegistrySettings(home=tmp_path)) as registry:
        jobs = FineTuningStore(registry.store)
        _, file_blob = store_bytes(registry.artifacts, b'{"messages": []}\n')
        jobs.add_file(filename="t.jsonl", purpose="fine-tune", bytes=17, sha256="0" * 64,
                      blob_sha256=file_blob, status="processed")  # fmt: skip
        blobs = {}
        for status in ("running", "succeeded", "failed", "cancelled"):
            job = new_job(jobs)
            blobs[status] = _blob(registry, status.encode())
            jobs.add_checkpoint(job, 4, {"step": 4}, blob_sha256=blobs[status])
            jobs.set_status(job, status)
        orphan = _blob(registry, b"orphan")
        report = sweep_orphans(registry.store, registry.artifacts, grace_seconds=0)
        removed = {blob.sha256 for blob in report.removed}
        # A running job resumes from its checkpoints; a succeeded one's are callable by id.
        assert removed == {blobs["failed"], blobs["cancelled"], orphan}
        assert registry.artifacts.exists(file_blob)
        assert registry.artifacts.exists(blobs["running"])
        assert registry.artifacts.exists(blobs["succeeded"])
