"""The server resolves `model` through the registry: NAME follows the production alias live,
NAME@V pins, NAME@ALIAS follows that alias; versions are warmed before traffic reaches them;
the admin API mirrors the CLI behind its own key."""

from __future__ import annotations

import io
import tarfile
import uuid

import httpx
import openai
import pytest

from tests.support.adapters import ADAPTER_SPECS, HELD_OUT_PROMPTS
from tests.support.fixtures import ADMIN_KEY
from tests.support.servers import wait_for

PROMPT = HELD_OUT_PROMPTS[0]


def answer(client: openai.OpenAI, model: str) -> tuple[str, str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=48
    )
    reply = raw.parse()
    return reply.model, raw.headers.get("x-loraplex-adapter", ""), reply.choices[0].message.content


def behaviour(text: str) -> set[str]:
    return {name for name, spec in ADAPTER_SPECS.items() if spec.check(text)}


def metrics(server) -> str:
    return httpx.get(f"{server.url}/metrics").text


@pytest.mark.engine
def test_promote_and_rollback_change_what_name_serves(real_server, client, test_adapters):
    registry = real_server.registry
    name = f"support-{uuid.uuid4().hex[:8]}"
    registry.register(name, test_adapters["caps"], actor="test")
    registry.register(name, test_adapters["prefix"], actor="test")

    with pytest.raises(openai.NotFoundError, match=f"registry promote {name}"):
        answer(client, name)
    assert behaviour(answer(client, f"{name}@2")[2]) == {"prefix"}  # pinned, not promoted

    registry.store.promote(name, 1, actor="test", reason="first release")
    wait_for(lambda: f"{name}" in [m.id for m in client.models.list()])
    model, header, text = answer(client, name)
    assert (model, header) == (f"{name}@1", f"{name}@1")
    assert behaviour(text) == {"caps"}

    registry.store.promote(name, 2, actor="test", reason="eval +4%")
    wait_for(lambda: answer(client, name)[0] == f"{name}@2")
    assert behaviour(answer(client, name)[2]) == {"prefix"}

    registry.store.rollback(name, actor="test", reason="complaints")
    wait_for(lambda: answer(client, name)[0] == f"{name}@1")
    assert behaviour(answer(client, name)[2]) == {"caps"}

    moves = registry.store.history(name)
    assert [(m.from_version, m.to_version, m.reason) for m in moves][-3:] == [
        (None, 1, "first release"),
        (1, 2, "eval +4%"),
        (2, 1, "complaints"),
    ]


@pytest.mark.engine
def test_a_promoted_version_is_loaded_before_it_gets_traffic(real_server, client, test_adapters):
    registry = real_server.registry
    name = f"warm-{uuid.uuid4().hex[:8]}"
    registry.register(name, test_adapters["suffix"], actor="test")
    registry.store.promote(name, 1, alias="staging", actor="test")
    loaded = f'loraplex_adapter_loads_total{{adapter="{name}@1",status="ok"}} 1.0'
    wait_for(lambda: loaded in metrics(real_server))  # warmed by the routing refresh
    model, _, text = answer(client, f"{name}@staging")
    assert model == f"{name}@1" and behaviour(text) == {"suffix"}
    assert loaded in metrics(real_server)  # the request did not load it again


@pytest.mark.engine
def test_unknown_versions_and_aliases_say_what_exists(real_server, client, test_adapters):
    name = f"nf-{uuid.uuid4().hex[:8]}"
    real_server.registry.register(name, test_adapters["caps"], actor="test")
    wait_for(lambda: f"{name}@1" in [m.id for m in client.models.list()])
    with pytest.raises(openai.NotFoundError, match="has no version 9; versions: 1"):
        answer(client, f"{name}@9")
    with pytest.raises(openai.NotFoundError, match="has no alias 'canary'"):
        answer(client, f"{name}@canary")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        answer(client, "no-such-adapter")


def _tar(folder) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


@pytest.mark.engine
def test_admin_api_registers_promotes_and_rolls_back(real_server, client, test_adapters):
    name = f"admin-{uuid.uuid4().hex[:8]}"
    admin = httpx.Client(
        base_url=f"{real_server.url}/admin",
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "x-loraplex-actor": "ops"},
        timeout=60,
    )
    assert httpx.get(f"{real_server.url}/admin/adapters").status_code == 401
    bad = httpx.get(
        f"{real_server.url}/admin/adapters", headers={"Authorization": "Bearer inference-key"}
    )
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"

    for spec in ("caps", "prefix"):
        r = admin.post(
            f"/adapters/{name}/versions",
            content=_tar(test_adapters[spec]),
            params={"tag": [f"behaviour={spec}"]},
        )
        assert r.status_code == 201, r.text
    assert r.json()["ref"] == f"{name}@2" and r.json()["tags"] == {"behaviour": "prefix"}

    nothing = admin.post(f"/adapters/{name}/rollback", json={})
    assert nothing.status_code in (400, 404), nothing.text
    for version in (1, 2):
        assert admin.post(f"/adapters/{name}/promote", json={"version": version}).status_code == 200
    wait_for(lambda: answer(client, name)[0] == f"{name}@2")
    r = admin.post(f"/adapters/{name}/rollback", json={"reason": "oops"})
    assert r.status_code == 200 and (r.json()["from"], r.json()["to"]) == (2, 1)
    history = admin.get(f"/adapters/{name}/history").json()
    assert history[-1]["actor"] == "ops" and history[-1]["reason"] == "oops"

    missing = admin.post(f"/adapters/{name}/promote", json={"version": 7})
    assert missing.status_code == 404 and "7" in missing.json()["error"]["message"]
    junk = admin.post(f"/adapters/{name}/versions", content=b"not a tar")
    assert junk.status_code == 400
    assert admin.get(f"/versions/{name}@1").json()["tags"] == {"behaviour": "caps"}
