"""The routes: /v1/files (purpose fine-tune) and /v1/fine_tuning/jobs, in OpenAI's shapes.

Every route needs a key allowed to train: the admin key when one is configured (an inference
key gets 403); with no keys configured at all the server is open, as its inference API is.
A request is checked whole before anything is written, so a refused one leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict

from registry.errors import RegistryUserError
from registry.fine_tuning import (
    FINE_TUNED_PREFIX,
    FineTuningStateError,
    FineTuningStore,
    resolve_fine_tuned,
)
from registry.refs import check_name
from registry.service import Registry
from server.auth import bearer_scheme, check_bearer, key_matches
from server.errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ResourceNotFoundError,
)
from server.fine_tuning import files, objects
from server.fine_tuning.settings import FineTuningSettings

router = APIRouter(prefix="/v1", tags=["fine-tuning"])
PURPOSE = "fine-tune"
MAX_FILENAME_CHARS = 512
MAX_METADATA_KEYS = 16
_HYPERPARAMETERS = {  # name -> (smallest, largest, integer)
    "n_epochs": (1, 50, True),
    "batch_size": (1, 256, True),
    "learning_rate_multiplier": (0, None, False),
}
_DPO_HYPERPARAMETERS = _HYPERPARAMETERS | {"beta": (0, None, False)}
_KINDS = {"supervised": "chat", "dpo": "preference"}  # method -> the data it trains on
_KIND_WORDS = {"chat": "chat JSONL ('messages')",
               "preference": "preference JSONL ('prompt', 'chosen', 'rejected')"}  # fmt: skip


def _registry(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Registry:
    app_state = request.app.state
    admin_key, api_keys = app_state.loraplex_admin_key, app_state.loraplex.api_keys
    if admin_key or api_keys:
        if credentials is not None and key_matches(credentials.credentials, api_keys):
            raise PermissionDeniedError(
                "Fine-tuning needs the admin key; this is an inference key."
            )
        if not admin_key:
            raise PermissionDeniedError(
                "Fine-tuning is disabled: start the server with --admin-key."
            )
        check_bearer(credentials, [admin_key], what="admin key")
    if app_state.loraplex_registry is None:
        raise InvalidRequestError("This server has no registry to fine-tune into.")
    return app_state.loraplex_registry


RegistryDep = Annotated[Registry, Depends(_registry)]


def _settings(request: Request) -> FineTuningSettings:
    return getattr(request.app.state, "loraplex_fine_tuning", None) or FineTuningSettings()


# Files


@router.post("/files")
async def upload_file(
    request: Request, registry: RegistryDep, file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> dict[str, Any]:  # fmt: skip
    if purpose != PURPOSE:
        raise InvalidRequestError(
            f"purpose {purpose!r} is not supported here: use {PURPOSE!r}", param="purpose"
        )
    filename = file.filename or "upload.jsonl"
    if len(filename) > MAX_FILENAME_CHARS:
        raise InvalidRequestError(f"filename is over {MAX_FILENAME_CHARS} characters", param="file")
    limit = _settings(request).fine_tuning_max_file_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLargeError(f"The file is over this server's limit of {limit} bytes.")
    row = await asyncio.to_thread(_store_file, registry, data, filename)
    return objects.file_object(row)


def _store_file(registry: Registry, data: bytes, filename: str):
    with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as tmp:
        path = Path(tmp) / files.DATA_FILE
        path.write_bytes(data)
        checked = files.validate_file(path)
    sha256, blob = files.store_bytes(registry.artifacts, data)
    return FineTuningStore(registry.store).add_file(
        filename=filename, purpose=PURPOSE, bytes=len(data), sha256=sha256, blob_sha256=blob,
        status="processed" if checked.ok else "error", status_details=checked.details,
        kind=checked.kind,
    )  # fmt: skip


@router.get("/files")
async def list_files(
    registry: RegistryDep, purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
) -> dict[str, Any]:  # fmt: skip
    rows = FineTuningStore(registry.store).list_files(purpose=purpose, limit=limit)
    body = objects.list_object([objects.file_object(r) for r in rows])
    return body | {"first_id": body.get("first_id"), "last_id": body.get("last_id")}


@router.get("/files/{file_id}")
async def retrieve_file(registry: RegistryDep, file_id: str) -> dict[str, Any]:
    return objects.file_object(FineTuningStore(registry.store).get_file(file_id))


@router.get("/files/{file_id}/content")
async def file_content(registry: RegistryDep, file_id: str):
    from fastapi.responses import Response

    row = FineTuningStore(registry.store).get_file(file_id)
    data = await asyncio.to_thread(files.read_bytes, registry.artifacts, row.blob_sha256)
    return Response(data, media_type="application/octet-stream")


@router.delete("/files/{file_id}")
async def delete_file(registry: RegistryDep, file_id: str) -> dict[str, Any]:
    row = FineTuningStore(registry.store).delete_file(file_id)
    return {"id": row.id, "object": "file", "deleted": True}


# Jobs


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] | None = None


@router.post("/fine_tuning/jobs")
async def create_job(request: Request, registry: RegistryDep, body: JobRequest) -> dict[str, Any]:
    store = FineTuningStore(registry.store)
    if body.suffix is None:
        raise InvalidRequestError(
            "suffix is required: it is the adapter name the result is registered as",
            param="suffix",
        )
    try:
        check_name(body.suffix)
    except RegistryUserError as e:
        raise InvalidRequestError(f"suffix: {e}", param="suffix") from e
    base = request.app.state.loraplex.resolver.model_names()[0]
    from_ref = None
    if body.model.startswith(FINE_TUNED_PREFIX):  # continue that job's registered version
        try:
            from_ref = resolve_fine_tuned(registry.store, body.model)
        except RegistryUserError as e:
            raise InvalidRequestError(str(e), param="model", code="model_not_found") from e
    elif body.model != base:
        raise InvalidRequestError(
            f"model {body.model!r} cannot be fine-tuned here: use the base model {base!r} or "
            "a fine_tuned_model (ft:...) to continue it",
            param="model", code="model_not_found",
        )  # fmt: skip
    method = _method(body)
    wanted = _KINDS[method["type"]]
    for param in ("training_file", "validation_file"):
        file_id = getattr(body, param)
        if file_id is None:
            continue
        try:
            row = store.get_file(file_id)
        except RegistryUserError as e:
            raise ResourceNotFoundError(str(e), param=param) from e
        if row.purpose != PURPOSE:
            raise InvalidRequestError(f"{file_id} has purpose {row.purpose!r}", param=param)
        if row.kind is not None and row.kind != wanted:
            raise InvalidRequestError(
                f"{file_id} holds {_KIND_WORDS[row.kind]}; a {method['type']} job trains on "
                f"{_KIND_WORDS[wanted]}", param=param,
            )  # fmt: skip
    if body.metadata is not None and len(body.metadata) > MAX_METADATA_KEYS:
        raise InvalidRequestError(
            f"metadata holds at most {MAX_METADATA_KEYS} keys", param="metadata"
        )
    job = store.create_job(
        model=body.model, training_file=body.training_file, validation_file=body.validation_file,
        suffix=body.suffix, seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        method=method, job_metadata=body.metadata, from_ref=from_ref,
    )  # fmt: skip
    return objects.job_object(job)


def _method(body: JobRequest) -> dict[str, Any]:
    method = body.method or {"type": "supervised"}
    kind = method.get("type")
    if kind not in _KINDS:
        raise InvalidRequestError(
            f"method type {kind!r} is not supported: use 'supervised' or 'dpo'", param="method"
        )
    known = _HYPERPARAMETERS if kind == "supervised" else _DPO_HYPERPARAMETERS
    given = (method.get(kind) or {}).get("hyperparameters")
    if given is None:
        given = body.hyperparameters or {}
    if not isinstance(given, dict):
        raise InvalidRequestError("hyperparameters must be an object", param="hyperparameters")
    hyper: dict[str, Any] = {}
    for name, (low, high, integer) in known.items():
        value = given.get(name, "auto")
        ok = value == "auto" or (
            isinstance(value, int if integer else int | float) and not isinstance(value, bool)
            and (value >= low if integer else value > low) and (high is None or value <= high)
        )  # fmt: skip
        if not ok:
            span = f"an integer {low}..{high}" if integer else f"a number above {low}"
            raise InvalidRequestError(
                f"{name} must be 'auto' or {span}, not {value!r}", param=f"hyperparameters.{name}"
            )
        hyper[name] = value
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise InvalidRequestError(
            f"unknown hyperparameters: {', '.join(unknown)}", param="hyperparameters"
        )
    return {"type": kind, kind: {"hyperparameters": hyper}}


@router.get("/fine_tuning/jobs")
async def list_jobs(
    request: Request, registry: RegistryDep, after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:  # fmt: skip
    wanted = {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    rows, more = FineTuningStore(registry.store).list_jobs(
        after=after, limit=limit, metadata=wanted
    )
    return objects.list_object([objects.job_object(r) for r in rows], has_more=more)


@router.get("/fine_tuning/jobs/{job_id}")
async def retrieve_job(registry: RegistryDep, job_id: str) -> dict[str, Any]:
    return objects.job_object(FineTuningStore(registry.store).get_job(job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(registry: RegistryDep, job_id: str) -> dict[str, Any]:
    return objects.job_object(FineTuningStore(registry.store).request_cancel(job_id))


@router.post("/fine_tuning/jobs/{job_id}/pause")
async def pause_job(registry: RegistryDep, job_id: str) -> dict[str, Any]:
    return _transition(FineTuningStore(registry.store).request_pause, job_id)


@router.post("/fine_tuning/jobs/{job_id}/resume")
async def resume_job(registry: RegistryDep, job_id: str) -> dict[str, Any]:
    return _transition(FineTuningStore(registry.store).request_resume, job_id)


def _transition(request: Any, job_id: str) -> dict[str, Any]:
    """A pause or resume; a job in a state that cannot take it is a 400."""
    try:
        return objects.job_object(request(job_id))
    except FineTuningStateError as e:
        raise InvalidRequestError(str(e), param="fine_tuning_job_id") from e


@router.get("/fine_tuning/jobs/{job_id}/events")
async def list_events(
    registry: RegistryDep, job_id: str, after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:  # fmt: skip
    rows, more = FineTuningStore(registry.store).list_events(job_id, after=after, limit=limit)
    return objects.list_object([objects.event_object(r) for r in rows], has_more=more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(
    registry: RegistryDep, job_id: str, after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict[str, Any]:  # fmt: skip
    store = FineTuningStore(registry.store)
    job = store.get_job(job_id)
    rows, more = store.list_checkpoints(job_id, after=after, limit=limit)
    return objects.list_object([objects.checkpoint_object(r, job) for r in rows], has_more=more)
