"""Bearer keys: the one parser of `Authorization: Bearer KEY`, for the inference API and /admin/.

FastAPI's `HTTPBearer` reads the header (and documents the scheme in the OpenAPI schema); this
module compares the token against the configured keys in constant time and raises the domain
errors that `server.errors` maps to 401/403. It knows nothing about which keys a route needs.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import AuthenticationError

# auto_error=False: a missing or non-Bearer header reaches `check_bearer`, which answers in
# OpenAI's error shape instead of FastAPI's default body.
bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")


def _as_bytes(text: str) -> bytes:
    # Starlette decodes header values as latin-1, so every header round-trips; keys from the
    # command line may hold any character. Bytes make `compare_digest` total (it raises
    # TypeError on non-ASCII str).
    return text.encode("utf-8", "surrogateescape")


def key_matches(token: str, keys: Iterable[str]) -> bool:
    """Constant-time comparison of `token` against every key (no early exit on a match)."""
    given = _as_bytes(token)
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, _as_bytes(key))
    return matched


def check_bearer(
    credentials: HTTPAuthorizationCredentials | None, keys: Iterable[str], *, what: str
) -> None:
    """Raise `AuthenticationError` unless the request carries one of `keys` as a Bearer token."""
    if credentials is None or not key_matches(credentials.credentials, keys):
        raise AuthenticationError(f"Missing or invalid {what} (Authorization: Bearer KEY).")
