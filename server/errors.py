"""The exception tree of the serving layer. Domain code raises these; `server.http_errors` maps
them once to OpenAI-shaped error bodies.

    LoraplexError
    ├── InvalidRequestError        400  the request is malformed or asks for something impossible
    │   └── ContextLengthError     400  prompt + max_tokens does not fit the context window
    ├── ModelNotFoundError         404  `model` names nothing servable
    ├── OverloadedError            429  too much queued; retry later
    ├── AdapterLoadError           500  an adapter's files were rejected when loading (engine unharmed)
    └── EngineError                500  the engine failed for a reason that is not the client's
        └── EngineNotReadyError    503  starting, stopping or dead
"""

from __future__ import annotations


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


class EngineError(LoraplexError):
    """The engine failed for a reason that is not the client's fault."""


class EngineNotReadyError(EngineError):
    def __init__(self, message: str = "The engine is not ready; try again shortly."):
        super().__init__(message, code="engine_not_ready")


class OverloadedError(LoraplexError):
    """Too many requests queued; the client should back off and retry."""

    def __init__(self, message: str):
        super().__init__(message, code="overloaded")
