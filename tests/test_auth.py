"""Bearer keys on the inference API and /admin/: one parser, OpenAI-shaped 401/403, never a 500."""

from __future__ import annotations

import httpx
import pytest

from server.auth import key_matches


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "secret",  # no scheme
        "Basic secret",
        "Bearer",
        "Bearer wrong",
        "Bearer s\u00e9cret",  # non-ASCII: hmac.compare_digest raises TypeError on such str
        "Bearer \u00ff" * 50,
    ],
)
def test_inference_key_refusals_are_401(fake_server, authorization):
    server = fake_server(api_keys=["secret"])
    headers = {} if authorization is None else {"Authorization": authorization}
    # httpx encodes str headers as ASCII; send latin-1 bytes as a client could.
    raw = {k: v.encode("latin-1") for k, v in headers.items()}
    response = httpx.get(f"{server.url}/v1/models", headers=raw)
    error = _error(response, 401)
    assert error["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"


def test_each_inference_key_works_and_bearer_is_case_insensitive(fake_server):
    server = fake_server(api_keys=["one", "two"])
    for auth in ("Bearer one", "bearer two"):
        assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": auth}).is_success


def test_admin_api_disabled_is_403_and_wrong_key_401(fake_server):
    closed = fake_server()
    _error(httpx.get(f"{closed.url}/admin/routing", headers={"Authorization": "Bearer x"}), 403)
    server = fake_server(api_keys=["inference"], admin_key="admin")
    for auth in (None, "Bearer inference", "Bearer adm\u00efn"):
        headers = {} if auth is None else {"Authorization": auth.encode("latin-1")}
        error = _error(httpx.get(f"{server.url}/admin/adapters", headers=headers), 401)
        assert "admin key" in error["message"]
    # The right key passes authentication; this app has no registry, which is a 404 of ours.
    ok = httpx.get(f"{server.url}/admin/adapters", headers={"Authorization": "Bearer admin"})
    assert "no registry" in _error(ok, 404)["message"]


def test_openapi_documents_the_bearer_scheme(fake_server):
    schema = httpx.get(f"{fake_server().url}/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert any(s.get("scheme", "").lower() == "bearer" for s in schemes.values())


def test_key_matches_is_total_over_strings():
    assert key_matches("k\u00e9y", ["k\u00e9y"])
    assert not key_matches("\udcff", ["key"])  # lone surrogates do not raise either
    assert not key_matches("key", [])
