"""Admin HTTP API under /admin/: the registry's commands over HTTP (register from an uploaded
archive, promote, rollback, history, list, show, routing), guarded by the admin key, which
inference keys do not satisfy. Routes are thin; the registry does the work (in a worker thread:
its calls block on the database and the artifact store).
"""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from registry.archive import unpack_archive
from registry.service import Registry
from server.auth import bearer_scheme, check_bearer
from server.errors import PermissionDeniedError, ResourceNotFoundError

MAX_UPLOAD_BYTES = 1024**3
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
    return request.headers.get("x-loraplex-actor") or "admin-api"


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
    body = await _read_body(request)
    tags = _parse_tags(tag or [])
    record = await run_in_threadpool(_register_archive, registry, name, body, actor, tags)
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


async def _read_body(request: Request) -> bytes:
    declared = int(request.headers.get("content-length") or 0)
    if declared > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"Archive larger than {MAX_UPLOAD_BYTES} bytes.")
    body = await request.body()
    if not body:
        raise HTTPException(400, "Send the adapter folder as a tar archive in the request body.")
    return gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body


def _parse_tags(pairs: list[str]) -> dict[str, str]:
    bad = [p for p in pairs if "=" not in p or not p.partition("=")[0]]
    if bad:
        raise HTTPException(400, f"tags must be k=v, got {bad}")
    return dict(p.split("=", 1) for p in pairs)


def _register_archive(registry: Registry, name: str, archive: bytes, actor: str, tags: dict):
    with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as tmp:
        tar = Path(tmp) / "upload.tar"
        tar.write_bytes(archive)
        folder = Path(tmp) / "adapter"
        folder.mkdir()
        unpack_archive(tar, folder)
        return registry.register(name, folder, actor=actor, tags=tags)
