"""The one place where exceptions become HTTP: OpenAI-shaped error bodies with the right status.

`{"error": {"message", "type", "param", "code"}}` for every failure, FastAPI's validation errors
included (400 listing every problem at once, never the default 422 body).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry.errors import RegistryError
from server.errors import LoraplexError, error_body, openai_error

_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    problems, params = [], []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return f"The request body is not valid JSON: {err.get('msg')}", None
        where = ".".join(loc) or "body"
        params.append(where)
        problems.append(f"{where}: {err.get('msg')}")
    count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
    return f"Invalid request ({count}): " + "; ".join(problems), params[0] if params else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoraplexError)
    @app.exception_handler(RegistryError)
    async def _domain(_: Request, exc: Exception) -> JSONResponse:
        status, body = error_body(exc)
        return JSONResponse(body, status_code=status, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        body = openai_error(message, type="invalid_request_error", param=param)
        return JSONResponse(body, status_code=400)

    # Only the framework raises these (unknown route, wrong method): routes raise domain errors.
    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _HTTP_TYPES.get(exc.status_code, "invalid_request_error")
        body = openai_error(str(exc.detail), type=kind)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        status, body = error_body(exc)
        return JSONResponse(body, status_code=status)
