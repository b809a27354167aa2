"""Admin HTTP API under /admin/: the registry's commands over HTTP (register from an uploaded
archive, promote, rollback, history, list, show, routing), guarded by the admin key, which
inference keys do not satisfy. Routes are thin; the registry does the work (in a worker thread:
its calls block on the database and the artifact store).

An upload is streamed to a temporary file and refused with 413 as soon as it passes
MAX_UPLOAD_BYTES (chunked bodies included); decompression and unpacking run in a worker thread,
capped in bytes and entries, so no archive can stall the event loop or fill the disk.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from registry.archive import DEFAULT_MAX_MEMBERS, gunzip_capped, is_gzip, unpack_archive
from registry.errors import ArchiveTooLargeError
from registry.records import VersionRecord
from registry.refs import MAX_ACTOR_CHARS, check_name
from registry.service import Registry
from server.auth import bearer_scheme, check_bearer
from server.errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ResourceNotFoundError,
)

MAX_UPLOAD_BYTES = 1024**3  # as sent (compressed or not)
# Above the registry's adapter limit: the tar's own headers and padding.
_TAR_OVERHEAD_BYTES = 16 * 1024**2
# After refusing an upload, read (and drop) this much more so that the client, still sending,
# reads the 413 instead of a connection reset; beyond it the connection is closed.
_DRAIN_BYTES = 64 * 1024**2
_WRITE_BYTES = 4 * 1024**2
ACTOR_HEADER = "x-loraplex-actor"
DEFAULT_ACTOR = "admin-api"
router = APIRouter(prefix="/admin", tags=["admin"])


def require_admin_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> str:
    """Returns the actor recorded in alias events (header x-loraplex-actor, else "admin-api")."""
    key = request.app.state.loraplex_admin_key
    if not key:
        raise PermissionDeniedError("The admin API is disabled: start the server with --admin-key.")
    check_bearer(credentials, [key], what="admin key")
    return request_actor(request)


def request_actor(request: Request) -> str:
    """The x-loraplex-actor header: at most MAX_ACTOR_CHARS printable characters (it is stored
    in alias events and printed by `history`), else 400; absent means DEFAULT_ACTOR."""
    raw = request.headers.get(ACTOR_HEADER)
    if raw is None or not raw.strip():
        return DEFAULT_ACTOR
    try:  # HTTP headers arrive as latin-1; clients send names as UTF-8
        actor = raw.encode("latin-1").decode("utf-8").strip()
    except UnicodeError:
        actor = raw.strip()
    if len(actor) > MAX_ACTOR_CHARS or not actor.isprintable():
        raise InvalidRequestError(
            f"{ACTOR_HEADER} must be at most {MAX_ACTOR_CHARS} printable characters.",
            param=ACTOR_HEADER,
        )
    return actor


def get_registry(request: Request, _: Annotated[str, Depends(require_admin_key)]) -> Registry:
    """The registry, after the admin key is checked (an anonymous caller learns nothing)."""
    registry = request.app.state.loraplex_registry
    if registry is None:
        raise ResourceNotFoundError("This server has no registry.")
    return registry


RegistryDep = Annotated[Registry, Depends(get_registry)]
ActorDep = Annotated[str, Depends(require_admin_key)]


class PromoteBody(BaseModel):
    version: int = Field(ge=1)
    alias: str = "production"
    reason: str = ""


class RollbackBody(BaseModel):
    alias: str = "production"
    reason: str = ""


@router.get("/adapters")
async def list_adapters(registry: RegistryDep, _: ActorDep) -> list[dict]:
    adapters = await run_in_threadpool(registry.store.list_adapters)
    return [a.to_json() for a in adapters]


@router.get("/adapters/{name}")
async def show_adapter(name: str, registry: RegistryDep, _: ActorDep) -> dict:
    return (await run_in_threadpool(registry.store.get_adapter, name)).to_json()


@router.get("/versions/{ref}")
async def show_version(ref: str, registry: RegistryDep, _: ActorDep) -> dict:
    """`ref` is NAME@VERSION or NAME@ALIAS (a bare NAME means its production alias)."""
    return (await run_in_threadpool(registry.store.resolve, ref)).to_json()


@router.post("/adapters/{name}/versions", status_code=201)
async def register_version(
    name: str,
    request: Request,
    registry: RegistryDep,
    actor: ActorDep,
    tag: Annotated[list[str] | None, Query(description="k=v, repeatable")] = None,
) -> dict:
    """Body: the adapter folder as a tar archive (optionally gzip-compressed)."""
    check_name(name)  # before the body: a bad name costs no upload
    tags = _parse_tags(tag or [])
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="loraplex-upload-"))
    try:
        upload = work / "upload"
        await _receive_upload(request, upload)
        record = await asyncio.to_thread(_register_upload, registry, name, upload, actor, tags)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    return record.to_json()


@router.post("/adapters/{name}/promote")
async def promote(name: str, body: PromoteBody, registry: RegistryDep, actor: ActorDep) -> dict:
    move = await run_in_threadpool(
        lambda: registry.store.promote(
            name, body.version, alias=body.alias, actor=actor, reason=body.reason
        )
    )
    return move.to_json()


@router.post("/adapters/{name}/rollback")
async def rollback(name: str, body: RollbackBody, registry: RegistryDep, actor: ActorDep) -> dict:
    move = await run_in_threadpool(
        lambda: registry.store.rollback(name, alias=body.alias, actor=actor, reason=body.reason)
    )
    return move.to_json()


@router.get("/adapters/{name}/history")
async def history(
    name: str, registry: RegistryDep, _: ActorDep, alias: str | None = None
) -> list[dict]:
    moves = await run_in_threadpool(lambda: registry.store.history(name, alias=alias))
    return [m.to_json() for m in moves]


@router.get("/routing")
async def routing(registry: RegistryDep, _: ActorDep) -> dict:
    return (await run_in_threadpool(registry.store.routing_snapshot)).to_json()


async def _receive_upload(request: Request, dest: Path) -> int:
    """Write the request body to `dest`, counting bytes as they arrive; 413 past the cap."""
    limit = MAX_UPLOAD_BYTES
    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise _upload_too_large(limit)
    size, pending = 0, bytearray()
    chunks = request.stream()
    with dest.open("wb") as out:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                await _drain(chunks, size)
                raise _upload_too_large(limit)
            pending += chunk
            if len(pending) >= _WRITE_BYTES:
                await asyncio.to_thread(out.write, bytes(pending))
                pending.clear()
        await asyncio.to_thread(out.write, bytes(pending))
    if size == 0:
        raise InvalidRequestError("Send the adapter folder as a tar archive in the request body.")
    return size


async def _drain(chunks, already: int) -> None:
    size = already
    async for chunk in chunks:
        size += len(chunk)
        if size > _DRAIN_BYTES:
            return


def _upload_too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The archive is larger than this server accepts ({limit} bytes).")


def _parse_tags(pairs: list[str]) -> dict[str, str]:
    bad = [p for p in pairs if "=" not in p or not p.partition("=")[0]]
    if bad:
        raise InvalidRequestError(f"tags must be k=v, got {bad}", param="tag")
    return dict(p.split("=", 1) for p in pairs)


def _register_upload(
    registry: Registry, name: str, upload: Path, actor: str, tags: dict[str, str]
) -> VersionRecord:
    """In a worker thread: decompress and unpack with caps, then register."""
    cap = registry.max_adapter_bytes + _TAR_OVERHEAD_BYTES
    try:
        tar = upload
        if is_gzip(upload):
            tar = upload.with_name("upload.tar")
            gunzip_capped(upload, tar, max_bytes=cap)
            upload.unlink()
        folder = upload.with_name("adapter")
        folder.mkdir()
        unpack_archive(tar, folder, max_bytes=cap, max_members=DEFAULT_MAX_MEMBERS)
    except ArchiveTooLargeError as e:
        raise PayloadTooLargeError(f"{e}.") from e
    return registry.register(name, folder, actor=actor, tags=tags)
