"""The exception tree of the serving layer and its OpenAI shape. Domain code raises these;
`error_body` gives each its status and body; `server.http_errors` installs it in FastAPI.

    LoraplexError
    ├── InvalidRequestError        400  the request is malformed or asks for something impossible
    │   └── ContextLengthError     400  prompt + max_tokens does not fit the context window
    ├── ModelNotFoundError         404  `model` names nothing servable
    ├── OverloadedError            429  too much queued; retry later
    ├── AdapterUnavailableError    503  an adapter version cannot be fetched right now (store down)
    ├── AdapterLoadError           500  an adapter's files were rejected when loading (engine unharmed)
    └── EngineError                500  the engine failed for a reason that is not the client's
        └── EngineNotReadyError    503  starting, stopping or dead
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class LoraplexError(Exception):
    """Base of every error the server reports to clients."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(LoraplexError):
    """The client sent something we cannot serve; the message says what was expected."""


class ContextLengthError(InvalidRequestError):
    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class ModelNotFoundError(LoraplexError):
    def __init__(self, message: str):
        super().__init__(message, param="model", code="model_not_found")


class AdapterLoadError(LoraplexError):
    """An adapter could not be loaded into the engine; the engine keeps serving."""

    def __init__(self, message: str, *, adapter: str):
        super().__init__(message, code="adapter_load_failed")
        self.adapter = adapter


class AdapterUnavailableError(LoraplexError):
    """An adapter version is neither cached here nor obtainable now; retrying later may work."""

    def __init__(self, message: str, *, adapter: str):
        super().__init__(message, code="adapter_unavailable")
        self.adapter = adapter


class EngineError(LoraplexError):
    """The engine failed for a reason that is not the client's fault."""


class EngineNotReadyError(EngineError):
    def __init__(self, message: str = "The engine is not ready; try again shortly."):
        super().__init__(message, code="engine_not_ready")


class OverloadedError(LoraplexError):
    """Too many requests queued; the client should back off and retry."""

    def __init__(self, message: str):
        super().__init__(message, code="overloaded")


# Most specific first; the first isinstance match wins.
_STATUS: tuple[tuple[type[LoraplexError], int, str], ...] = (
    (InvalidRequestError, 400, "invalid_request_error"),
    (ModelNotFoundError, 404, "invalid_request_error"),
    (OverloadedError, 429, "rate_limit_error"),
    (EngineNotReadyError, 503, "service_unavailable_error"),
    (AdapterUnavailableError, 503, "service_unavailable_error"),
    (AdapterLoadError, 500, "server_error"),
    (LoraplexError, 500, "server_error"),
)


def openai_error(message: str, *, type: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_body(exc: Exception) -> tuple[int, dict]:
    if isinstance(exc, LoraplexError):
        for cls, status, kind in _STATUS:
            if isinstance(exc, cls):
                return status, openai_error(exc.message, type=kind, param=exc.param, code=exc.code)
    log.exception("unexpected error", exc_info=exc)
    return 500, openai_error(f"Internal server error: {type(exc).__name__}", type="server_error")
