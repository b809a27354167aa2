"""Limits checked before a request reaches a route: header sizes, a well-formed content-length, and
the size of an inference request's body (everything under /v1/), chunked bodies included.

A plain ASGI middleware. It reads an inference body up to the limit before the app sees it (the
routes parse the whole JSON body anyway) and replays it, so an oversized body is refused with 413
in OpenAI's error shape and never buffered beyond the limit. Upload routes (`POST /v1/files`) get
their own, larger limit and are not buffered here: their body streams through, counted, and the
read that passes the limit raises a 413 (a declared content-length over it is refused at once).
/admin/ uploads keep their own cap.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from server.errors import (
    HeadersTooLargeError,
    InvalidRequestError,
    LoraplexError,
    PayloadTooLargeError,
    error_body,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024**2
# Far above any real header (a bearer key, a user agent, an actor name), far below what a client
# could use to make the server hold or log large values.
MAX_HEADER_VALUE_BYTES = 8 * 1024
# After refusing a body, read (and drop) this much more of it so that the client, which is still
# sending, gets to read the 413 instead of a connection reset; beyond it the connection is closed.
_DRAIN_BYTES = 64 * 1024**2
_LIMITED_PREFIX = "/v1/"
UPLOAD_OVERHEAD_BYTES = 64 * 1024  # a multipart body's boundaries, part headers and form fields


class RequestLimits:
    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        upload_bytes: dict[str, int] | None = None,
    ) -> None:  # fmt: skip
        """`upload_bytes`: path -> the largest body a POST there may have, streamed through."""
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.upload_bytes = dict(upload_bytes or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = _checked_headers(scope.get("headers", ()))
            path = scope.get("path", "")
            if not path.startswith(_LIMITED_PREFIX):
                await self.app(scope, receive, send)
                return
            upload = self.upload_bytes.get(path) if scope.get("method") == "POST" else None
            if upload is not None:
                if declared is not None and declared > upload:
                    await _drain(receive, 0)
                    raise _too_large(upload)
                await self.app(scope, _counted(receive, upload), send)
                return
            body = await self._read_body(receive, declared)
        except LoraplexError as e:
            await _refuse(send, e)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive, declared: int | None) -> bytes:
        limit = self.max_body_bytes
        if declared is not None and declared > limit:
            await _drain(receive, 0)
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break  # the app sees an empty body; the client is gone and reads nothing
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                if message.get("more_body", False):
                    await _drain(receive, size)
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _checked_headers(headers) -> int | None:
    """The declared content-length, once every header has been checked."""
    declared = None
    for raw_name, value in headers:
        name = raw_name.decode("latin-1").lower()
        if len(value) > MAX_HEADER_VALUE_BYTES:
            raise HeadersTooLargeError(
                f"Header {name} is {len(value)} bytes; at most {MAX_HEADER_VALUE_BYTES} "
                "are accepted.",
                header=name,
            )
        if name == "content-length":
            text = value.decode("latin-1").strip()
            if not text.isascii() or not text.isdigit():
                raise InvalidRequestError(
                    "content-length must be a non-negative integer.", param="content-length"
                )
            declared = int(text)
    return declared


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"The request body is larger than this server accepts ({limit} bytes); send a shorter "
        "prompt or fewer messages."
    )


async def _drain(receive: Receive, already: int) -> None:
    size = already
    while size <= _DRAIN_BYTES:
        message = await receive()
        size += len(message.get("body", b""))
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


class UploadTooLarge(HTTPException):
    """Raised by the counted receive of an upload: the framework answers it as a 413 in OpenAI's
    error shape (an HTTPException is the one kind it passes on from reading a form)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, str(_too_large(limit)))


def _counted(receive: Receive, limit: int) -> Receive:
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                if message.get("more_body", False):
                    await _drain(receive, size)
                raise UploadTooLarge(limit)
        return message

    return counted


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards only http.disconnect, which streams listen for

    return replayed


async def _refuse(send: Send, exc: LoraplexError) -> None:
    status, body = error_body(exc)
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
