"""The OpenAI objects (file, fine_tuning.job, event, checkpoint, lists) built from the rows."""

from __future__ import annotations

from typing import Any

from registry.fine_tuning import (
    ORGANIZATION,
    checkpoint_id,
    checkpoint_model_id,
    event_id,
    unix,
)
from registry.fine_tuning_tables import CheckpointRow, FileRow, JobEventRow, JobRow


def file_object(row: FileRow) -> dict[str, Any]:
    body = {
        "id": row.id, "object": "file", "bytes": row.bytes, "created_at": unix(row.created_at),
        "filename": row.filename, "purpose": row.purpose, "status": row.status,
    }  # fmt: skip
    if row.status_details is not None:
        body["status_details"] = row.status_details
    return body


def job_object(row: JobRow) -> dict[str, Any]:
    method = row.method
    hyper = method.get(method["type"], {}).get("hyperparameters", {})
    return {
        "id": row.id, "object": "fine_tuning.job", "created_at": unix(row.created_at),
        "error": row.error, "fine_tuned_model": row.fine_tuned_model,
        "finished_at": unix(row.finished_at), "hyperparameters": hyper, "model": row.model,
        "organization_id": ORGANIZATION, "result_files": list(row.result_files),
        "status": row.status, "trained_tokens": row.trained_tokens,
        "training_file": row.training_file, "validation_file": row.validation_file,
        "seed": row.seed, "metadata": row.job_metadata, "method": method,
        "estimated_finish": None, "integrations": None, "user_provided_suffix": row.suffix,
    }  # fmt: skip


def event_object(row: JobEventRow) -> dict[str, Any]:
    body = {
        "id": event_id(row), "object": "fine_tuning.job.event", "created_at": unix(row.created_at),
        "level": row.level, "message": row.message, "type": row.type,
    }  # fmt: skip
    if row.data is not None:
        body["data"] = row.data
    return body


def checkpoint_object(row: CheckpointRow, job: JobRow) -> dict[str, Any]:
    return {
        "id": checkpoint_id(row), "object": "fine_tuning.job.checkpoint",
        "created_at": unix(row.created_at), "fine_tuning_job_id": job.id,
        "fine_tuned_model_checkpoint": checkpoint_model_id(job, row.step),
        "metrics": row.metrics, "step_number": row.step,
    }  # fmt: skip


def list_object(data: list[dict[str, Any]], *, has_more: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
    if data:
        body["first_id"], body["last_id"] = data[0]["id"], data[-1]["id"]
    return body
