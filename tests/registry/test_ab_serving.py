"""The A/B router serving real HTTP on a real registry database (SQLite and PostgreSQL), with the
fake engine: sticky assignment across replicas and restarts, pins bypass the experiment,
recording adds up across replicas, feedback joins on any replica, automatic promotion and
rollback land in the alias history with their statistics, and an experiment that cannot keep
every arm resident is not applied."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from registry.experiment_records import VariantSpec
from registry.service import Registry
from server.ab.config import ExperimentConfig
from tests.support.registry_stack import RegistryStack
from tests.support.servers import wait_for

ADMIN = "admin-secret"


def _setup(registry: Registry, make_adapter: Callable[..., Path], versions: int = 2) -> None:
    for _ in range(versions):
        registry.register("support", make_adapter(), actor="t")
    registry.store.promote("support", 1, actor="t")


def _start(registry: Registry, *, ramp=(50.0,), variants=(1, 2), weights=None, **config):
    weights = weights or [1.0] * len(variants)
    return registry.store.experiments.start(
        "support",
        variants=[VariantSpec(v, w) for v, w in zip(variants, weights, strict=True)],
        ramp=ramp, config=ExperimentConfig(**config).to_json(), actor="t",
    )  # fmt: skip


def _ask(stack: RegistryStack, user: str | None, *, model: str = "support"):
    """(model that answered, variant header, completion id)."""
    extra = {"user": user} if user is not None else {}
    raw = stack.client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1, **extra
    )
    reply = raw.parse()
    return reply.model, raw.headers.get("x-loraplex-variant"), reply.id


def _applied(stack: RegistryStack, experiment_id: int) -> bool:
    return any(e.id == experiment_id for e in stack.resolver.experiments.router.applied())


def test_same_user_same_variant_on_every_replica_and_after_a_restart(
    tmp_path, registry, make_adapter, stacks
):
    _setup(registry, make_adapter)
    exp = _start(registry)
    a = RegistryStack(tmp_path / "a", registry).serve()
    b = RegistryStack(tmp_path / "b", registry).serve()
    stacks += [a, b]
    wait_for(lambda: _applied(a, exp.id) and _applied(b, exp.id))
    users = [f"u{i}" for i in range(60)]
    first = {u: _ask(a, u)[:2] for u in users}
    assert {m for m, _ in first.values()} == {"support@1", "support@2"}
    for u in users:
        assert _ask(b, u)[:2] == first[u]
        assert _ask(a, u)[:2] == first[u]
    a.stop()
    again = RegistryStack(tmp_path / "a2", registry).serve()
    stacks.append(again)
    wait_for(lambda: _applied(again, exp.id))
    assert {u: _ask(again, u)[:2] for u in users} == first


def test_pins_bypass_the_experiment_and_headers_name_it(tmp_path, registry, make_adapter, stacks):
    _setup(registry, make_adapter)
    exp = _start(registry)
    stack = RegistryStack(tmp_path, registry).serve()
    stacks.append(stack)
    wait_for(lambda: _applied(stack, exp.id))
    raw = stack.client.chat.completions.with_raw_response.create(
        model="support", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
        extra_headers={"x-loraplex-user": "header-user"},
    )  # fmt: skip
    assert raw.headers["x-loraplex-experiment"] == str(exp.id)
    variant = int(raw.headers["x-loraplex-variant"])
    assert raw.parse().model == f"support@{exp.variants[variant].version}"
    assert raw.headers["x-loraplex-adapter"] == raw.parse().model
    assert _ask(stack, "header-user")[:2] == (raw.parse().model, str(variant))  # same key, field
    for pinned in ("support@2", "support@production"):
        model, variant_header, _ = _ask(stack, "header-user", model=pinned)
        assert variant_header is None
    assert "support" in [m.id for m in stack.client.models.list()]


def test_recording_adds_up_across_replicas_and_unkeyed_requests_are_counted(
    tmp_path, registry, make_adapter, stacks
):
    _setup(registry, make_adapter)
    exp = _start(registry)
    a = RegistryStack(tmp_path / "a", registry).serve()
    b = RegistryStack(tmp_path / "b", registry).serve()
    stacks += [a, b]
    wait_for(lambda: _applied(a, exp.id) and _applied(b, exp.id))
    rng = random.Random(7)
    users = [f"user-{i}" for i in range(40)]
    sent = 0
    for _ in range(120):
        _ask(rng.choice((a, b)), rng.choice(users))
        sent += 1
    for _ in range(10):
        _ask(a, None)
    store = registry.store.experiments
    wait_for(lambda: sum(t.requests for t in store.totals(exp.id).values()) == sent + 10)
    totals = store.totals(exp.id)
    assert sum(t.unkeyed_requests for t in totals.values()) == 10
    assert sum(store.exposure_counts(exp.id).values()) == len(set(users))
    # Prometheus on each replica saw its own share.
    seen = sum(
        s.sample(
            "loraplex_ab_requests_total",
            {
                "adapter": "support",
                "version": str(v.version),
                "experiment": str(exp.id),
                "variant": str(v.index),
            },
        )  # fmt: skip
        for s in (a, b)
        for v in exp.variants
    )
    assert seen == sent + 10


def test_feedback_joins_on_any_replica_and_its_edge_cases(tmp_path, registry, make_adapter, stacks):
    _setup(registry, make_adapter)
    exp = _start(registry)
    a = RegistryStack(tmp_path / "a", registry).serve()
    b = RegistryStack(tmp_path / "b", registry).serve()
    stacks += [a, b]
    wait_for(lambda: _applied(a, exp.id))
    model, variant, completion = _ask(a, "rater")
    rated = httpx.post(f"{b.url}/v1/feedback", json={"completion_id": completion, "score": 0.75})
    assert rated.status_code == 200, rated.text
    body = rated.json()
    assert (body["model"], str(body["variant"]), body["duplicate"]) == (model, variant, False)
    again = httpx.post(f"{a.url}/v1/feedback", json={"completion_id": completion, "score": 0.0})
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["score"] == 0.75  # the first rating stands
    totals = registry.store.experiments.totals(exp.id)[int(variant)]
    assert (totals.feedback_count, totals.feedback_sum) == (1, 0.75)

    unknown = httpx.post(
        f"{a.url}/v1/feedback", json={"completion_id": "chatcmpl-nope", "score": 1}
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "completion_id"
    pinned = _ask(a, "rater", model="support@1")[2]  # served outside the experiment
    assert httpx.post(f"{a.url}/v1/feedback",
                      json={"completion_id": pinned, "score": 1}).status_code == 404  # fmt: skip
    for bad in ({"completion_id": completion, "score": 1.5}, {"completion_id": completion},
                {"score": "x"}, {"completion_id": completion, "score": -0.1}):  # fmt: skip
        r = httpx.post(f"{a.url}/v1/feedback", json=bad)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    broken = httpx.post(f"{a.url}/v1/feedback", content=b"{not json",
                        headers={"content-type": "application/json"})  # fmt: skip
    assert broken.status_code == 400


@pytest.mark.parametrize("winner", ["candidate", "control"])
def test_auto_decision_is_taken_once_across_replicas_and_the_event_carries_the_statistics(
    tmp_path, registry, make_adapter, stacks, winner
):
    _setup(registry, make_adapter)
    exp = _start(
        registry, auto=True, window_seconds=0.5, dwell_seconds=0, final_dwell_seconds=0,
        min_users_per_arm=15, guardrails={},
    )  # fmt: skip
    replicas = [RegistryStack(tmp_path / name, registry).serve() for name in ("a", "b")]
    stacks += replicas
    wait_for(lambda: all(_applied(s, exp.id) for s in replicas))
    good = 2 if winner == "candidate" else 1
    i = 0

    def ended() -> bool:
        nonlocal i
        for _ in range(10):
            i += 1
            stack = replicas[i % 2]
            model, _, completion = _ask(stack, f"sim-{i}")
            score = 1.0 if model == f"support@{good}" else 0.0
            rater = replicas[(i // 2) % 2]  # often not the replica that served it
            httpx.post(
                f"{rater.url}/v1/feedback", json={"completion_id": completion, "score": score}
            )
        return not registry.store.experiments.get(exp.id).running

    wait_for(ended, timeout=60)
    final = registry.store.experiments.get(exp.id)
    assert final.status == ("promoted" if winner == "candidate" else "rolled_back")
    history = registry.store.history("support")
    decided = [e for e in history if e.details and e.details.get("experiment") == exp.id]
    assert len(decided) == 1  # two replicas analysed; one acted
    acted = sum(
        s.sample(
            "loraplex_ab_actions_total",
            {"adapter": "support", "experiment": str(exp.id), "action": a},
        )  # fmt: skip
        for s in replicas
        for a in ("promote", "rollback")
    )
    assert acted == 1
    event = decided[0]
    assert event.details["decision"] == ("promote" if winner == "candidate" else "rollback")
    stats = event.details["statistics"]["comparisons"]["1"]["primary"]
    if winner == "candidate":
        assert event.kind == "promote" and event.to_version == 2 and stats["lower"] > 0
    else:
        assert event.to_version == 1 and stats["upper"] < 0
    assert registry.store.resolve("support").number == good
    for stack in replicas:
        wait_for(lambda s=stack: not s.resolver.experiments.router.applied())
        assert _ask(stack, "after")[:2] == (f"support@{good}", None)


def test_an_experiment_that_cannot_keep_every_arm_resident_serves_the_control(
    tmp_path, registry, make_adapter, stacks
):
    _setup(registry, make_adapter, versions=5)
    _start(registry, ramp=None, variants=(1, 2, 3, 4, 5))  # the fake engine batches 4
    stack = RegistryStack(tmp_path, registry).serve()
    stacks.append(stack)
    wait_for(lambda: "not applied" in (stack.ready().get("reason") or ""))
    assert stack.ready()["status"] == "degraded"
    assert "--max-loras" in stack.ready()["reason"]
    model, variant, _ = _ask(stack, "someone")
    assert (model, variant) == ("support@1", None)  # the control serves


def test_admin_experiments_api(tmp_path, registry, make_adapter, stacks):
    _setup(registry, make_adapter, versions=3)
    stack = RegistryStack(tmp_path, registry).serve(admin_key=ADMIN)
    stacks.append(stack)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    url = f"{stack.url}/admin/experiments"
    plan = {"name": "support", "control": 1, "candidate": 2, "ramp": [10, 50]}
    assert httpx.post(url, json=plan).status_code == 401
    assert httpx.post(url, json=plan, headers={"Authorization": "Bearer nope"}).status_code == 401
    bad = httpx.post(url, headers=auth, json={**plan, "candidate": None, "ramp": [60],
                     "config": {"alpha": 2, "guardrails": {"tokens": 0.1}}})  # fmt: skip
    assert bad.status_code == 400
    message = bad.json()["error"]["message"]
    assert "--candidate" in message and "alpha" in message and "tokens" in message
    started = httpx.post(url, headers={**auth, "x-loraplex-actor": "ci"}, json=plan)
    assert started.status_code == 201, started.text
    exp = started.json()
    assert exp["created_by"] == "ci" and exp["ramp"] == [10, 50]
    conflict = httpx.post(url, headers=auth, json={**plan, "candidate": 3})
    assert conflict.status_code == 409 and "ab stop support" in conflict.json()["error"]["message"]
    wait_for(lambda: _applied(stack, exp["id"]))
    _ask(stack, "someone")
    status = httpx.get(f"{url}/support", headers=auth).json()
    assert status["experiment"]["id"] == exp["id"] and len(status["variants"]) == 2
    assert [e["id"] for e in httpx.get(url, headers=auth, params={"running": True}).json()] == [
        exp["id"]
    ]
    wrong = httpx.post(f"{url}/support/stop", headers=auth, json={"promote": 3})
    assert wrong.status_code == 400 and "not a variant" in wrong.json()["error"]["message"]
    stopped = httpx.post(f"{url}/support/stop", headers=auth, json={"promote": 2})
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["alias_event"]["to"] == 2 and stopped.json()["status"] == "promoted"
    assert httpx.get(f"{url}/nothing", headers=auth).status_code == 404
