"""HTTP routes of the OpenAI-compatible API and the operational endpoints. Routes are thin: they
check the key, call `CompletionService`, and wrap its result; errors map in `server.http_errors`.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST

from server.ab.assignment import MAX_USER_KEY_CHARS
from server.auth import bearer_scheme, check_bearer
from server.errors import InvalidRequestError, LoraplexError, error_body
from server.metrics import render_metrics
from server.openai_service import CompletionService, Prepared
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.state import AppState

router = APIRouter()


def get_state(request: Request) -> AppState:
    return request.app.state.loraplex


StateDep = Annotated[AppState, Depends(get_state)]


def require_inference_key(
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    if state.api_keys:
        check_bearer(credentials, state.api_keys, what="API key")


async def _require_ready(state: AppState) -> CompletionService:
    await state.admit()  # 503 until startup has finished, and for good once the engine died
    return state.service


class _EventStreamResponse(StreamingResponse):
    """Closes its `EventStream` when the response ends however it ends (done, client gone,
    body never iterated), so a streamed request always returns its adapter lease."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


USER_HEADER = "x-loraplex-user"


def _respond(prepared: Prepared, body_or_stream, *, stream: bool) -> Response:
    headers = {}
    if prepared.target.adapter is not None:
        headers["x-loraplex-adapter"] = prepared.target.served_as
    if (assignment := prepared.target.assignment) is not None:
        headers["x-loraplex-experiment"] = str(assignment.experiment_id)
        headers["x-loraplex-variant"] = str(assignment.variant.index)
    if stream:
        return _EventStreamResponse(body_or_stream, media_type="text/event-stream", headers=headers)
    return JSONResponse(body_or_stream, headers=headers)


def user_key(req: ChatCompletionRequest | CompletionRequest, request: Request) -> str | None:
    """The sticky A/B key: OpenAI's `user` field, else the x-loraplex-user header."""
    key = req.user or request.headers.get(USER_HEADER)
    key = key.strip() if key else None
    if key and len(key) > MAX_USER_KEY_CHARS:
        raise InvalidRequestError(
            f"The user key is longer than {MAX_USER_KEY_CHARS} characters.", param="user"
        )
    return key or None


async def _prepare(
    state: AppState, req: ChatCompletionRequest | CompletionRequest, request: Request
) -> Prepared:
    """Prepare, counting a rejected request under its model (or "unknown": labels stay bounded)."""
    try:
        service = await _require_ready(state)
        user = user_key(req, request)
        if isinstance(req, ChatCompletionRequest):
            return await service.prepare_chat(req, user=user)
        return await service.prepare_completion(req, user=user)
    except LoraplexError as e:
        known = req.model in state.resolver.model_names()
        endpoint = "chat" if isinstance(req, ChatCompletionRequest) else "completions"
        status, _ = error_body(e)
        state.metrics.observe_request(
            model=req.model if known else "unknown", endpoint=endpoint, status=status
        )
        raise


@router.post("/v1/chat/completions", dependencies=[Depends(require_inference_key)])
async def chat_completions(
    req: ChatCompletionRequest, state: StateDep, request: Request
) -> Response:
    prepared = await _prepare(state, req, request)
    service = state.service
    if req.stream:
        return _respond(prepared, await service.open_stream(prepared), stream=True)
    return _respond(prepared, await service.complete(prepared), stream=False)


@router.post("/v1/completions", dependencies=[Depends(require_inference_key)])
async def completions(req: CompletionRequest, state: StateDep, request: Request) -> Response:
    prepared = await _prepare(state, req, request)
    service = state.service
    if req.stream:
        return _respond(prepared, await service.open_stream(prepared), stream=True)
    return _respond(prepared, await service.complete(prepared), stream=False)


@router.get("/v1/models", dependencies=[Depends(require_inference_key)])
async def list_models(state: StateDep) -> dict:
    base = state.engine.info
    data = [
        {
            "id": name,
            "object": "model",
            "created": state.started_at,
            "owned_by": "loraplex",
            "root": base.path if name == base.served_name else name,
            "parent": None if name == base.served_name else base.served_name,
            "max_model_len": base.max_model_len,
        }
        for name in state.resolver.model_names()
    ]
    return {"object": "list", "data": data}


@router.get("/health")
async def health(state: StateDep) -> JSONResponse:
    """Liveness: 200 while this process can serve or is starting; 503 once its engine died,
    so that a supervisor restarts it (the process exits too, when run by `loraplex serve`)."""
    if (dead := await state.dead_reason()) is not None:
        body = {"status": "dead", "reason": dead, "time": time.time()}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ok", "time": time.time()})


@router.get("/ready")
async def ready(state: StateDep) -> JSONResponse:
    problem = await state.readiness_problem()
    if problem:
        return JSONResponse({"status": "not ready", "reason": problem}, status_code=503)
    info = state.engine.info
    body = {
        "status": "ready", "model": info.served_name,
        "dtype": info.dtype, "dtype_reason": info.dtype_reason,
    }  # fmt: skip
    if degraded := state.degraded():
        body.update(status="degraded", reason=degraded)
    return JSONResponse(body)


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    """The server's instruments and the engine's vLLM-named ones (`vllm:*`, which routers such
    as the Gateway API Inference Extension's endpoint picker read), ready or not."""
    state.metrics.engine_ready.set(1 if state.engine.ready else 0)
    body = render_metrics(state.metrics.registry, state.engine)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
