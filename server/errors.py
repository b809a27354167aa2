"""The exception tree of the serving layer and its OpenAI shape. Domain code raises these;
`error_body` gives each its status and body (the registry's own errors too: one table for every
exception that reaches a client); `server.http_errors` installs it in FastAPI.

    LoraplexError
    ├── InvalidRequestError        400  the request is malformed or asks for something impossible
    │   └── ContextLengthError     400  prompt + max_tokens does not fit the context window
    ├── AuthenticationError        401  no key, or not one of the configured keys
    ├── PermissionDeniedError      403  the key is fine but the feature is off (admin API disabled)
    ├── ModelNotFoundError         404  `model` names nothing servable
    ├── ResourceNotFoundError      404  any other thing a route looks up (no registry configured)
    ├── PayloadTooLargeError       413  the request body is over the server's byte limit
    ├── HeadersTooLargeError       431  one request header is over the server's byte limit
    ├── OverloadedError            429  too much queued; retry later
    ├── AdapterUnavailableError    503  an adapter version cannot be fetched right now (store down)
    ├── AdapterLoadError           500  an adapter's files were rejected when loading (engine unharmed)
    └── EngineError                500  the engine failed for a reason that is not the client's
        └── EngineNotReadyError    503  starting or stopping
            └── EngineDeadError    503  the engine stopped for good: /health fails, the process exits
"""

from __future__ import annotations

import logging

from registry.errors import (
    ArtifactIntegrityError,
    ExperimentConflictError,
    ExperimentNotRunningError,
    NotFoundError,
    RegistryError,
    RegistryUserError,
)

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


class AuthenticationError(LoraplexError):
    """The request carries no valid key; answered with `WWW-Authenticate: Bearer`."""

    headers = {"WWW-Authenticate": "Bearer"}

    def __init__(self, message: str):
        super().__init__(message, code="invalid_api_key")


class PermissionDeniedError(LoraplexError):
    """The caller may not use this; another key will not help."""


class ResourceNotFoundError(LoraplexError):
    """Something a route looks up (other than a model) does not exist here."""


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
    def __init__(
        self,
        message: str = "The engine is not ready; try again shortly.",
        *,
        code: str = "engine_not_ready",
    ):
        super().__init__(message, code=code)


class EngineDeadError(EngineNotReadyError):
    """The engine cannot serve again in this process (its core process died): only a restart
    helps, so `/health` fails and `loraplex serve` exits."""

    def __init__(self, message: str = "The engine has stopped; this server is shutting down."):
        super().__init__(message, code="engine_dead")


class PayloadTooLargeError(LoraplexError):
    """The request body is larger than the server accepts (`max_request_bytes`)."""

    def __init__(self, message: str):
        super().__init__(message, code="request_too_large")


class HeadersTooLargeError(LoraplexError):
    """A request header value is larger than any legitimate client sends."""

    def __init__(self, message: str, *, header: str):
        super().__init__(message, param=header, code="header_too_large")


class OverloadedError(LoraplexError):
    """Too many requests queued; the client should back off and retry."""

    def __init__(self, message: str):
        super().__init__(message, code="overloaded")


# Most specific first; the first isinstance match wins.
_STATUS: tuple[tuple[type[LoraplexError], int, str], ...] = (
    (InvalidRequestError, 400, "invalid_request_error"),
    (AuthenticationError, 401, "authentication_error"),
    (PermissionDeniedError, 403, "permission_error"),
    (ModelNotFoundError, 404, "invalid_request_error"),
    (ResourceNotFoundError, 404, "invalid_request_error"),
    (PayloadTooLargeError, 413, "invalid_request_error"),
    (HeadersTooLargeError, 431, "invalid_request_error"),
    (OverloadedError, 429, "rate_limit_error"),
    (EngineNotReadyError, 503, "service_unavailable_error"),
    (AdapterUnavailableError, 503, "service_unavailable_error"),
    (AdapterLoadError, 500, "server_error"),
    (LoraplexError, 500, "server_error"),
)


def openai_error(message: str, *, type: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _registry_status(exc: RegistryError) -> tuple[int, str]:
    if isinstance(exc, ExperimentConflictError | ExperimentNotRunningError):
        return 409, "invalid_request_error"  # the experiment's state, not the request, is wrong
    if isinstance(exc, NotFoundError):
        return 404, "invalid_request_error"
    if isinstance(exc, RegistryUserError):
        return 400, "invalid_request_error"
    if isinstance(exc, ArtifactIntegrityError):
        return 400, "invalid_request_error"  # on upload: the client's archive is unsafe
    return 503, "service_unavailable_error"  # artifact store or database unavailable


def error_body(exc: Exception) -> tuple[int, dict]:
    """Status and OpenAI-shaped body for any exception; unexpected ones are logged as 500s."""
    if isinstance(exc, LoraplexError):
        for cls, status, kind in _STATUS:
            if isinstance(exc, cls):
                return status, openai_error(exc.message, type=kind, param=exc.param, code=exc.code)
    if isinstance(exc, RegistryError):
        status, kind = _registry_status(exc)
        return status, openai_error(str(exc), type=kind)
    log.exception("unexpected error", exc_info=exc)
    return 500, openai_error(f"Internal server error: {type(exc).__name__}", type="server_error")
