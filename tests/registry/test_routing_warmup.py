"""Routing never moves traffic to a version this replica cannot serve: a promotion whose warm-up
fails (artifact missing from the store, rank over this engine's limit) keeps the alias on its
previous version here, is counted and reported as degraded, is retried and switches once warm;
a refresh warms only what changed; unknown names are remembered briefly and the 404 stays short.
Real SQLite and file artifact store, the fake engine over real HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import event

from registry.service import Registry
from registry.settings import RegistrySettings
from tests.support.registry_stack import RegistryStack
from tests.support.servers import wait_for


@pytest.fixture
def artifacts_root(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture
def sqlite_registry(tmp_path: Path, artifacts_root: Path) -> Iterator[Registry]:
    settings = RegistrySettings(
        home=tmp_path / "home",
        registry=f"sqlite:///{tmp_path / 'registry.db'}",
        artifacts=artifacts_root.as_uri(),
    )
    with Registry.open(settings) as registry:
        yield registry


def archive_of(artifacts_root: Path, sha256: str) -> Path:
    (found,) = artifacts_root.rglob(f"{sha256}*")
    return found


def test_a_promotion_that_cannot_warm_keeps_the_old_version_until_it_can(
    tmp_path, sqlite_registry, artifacts_root, make_adapter, stacks
):
    registry = sqlite_registry
    registry.register("support", make_adapter(), actor="t")
    v2 = registry.register("support", make_adapter(), actor="t")
    registry.store.promote("support", 1, actor="t")
    stack = RegistryStack(tmp_path, registry).serve()
    stacks.append(stack)
    assert stack.served("support") == "support@1"

    archive = archive_of(artifacts_root, v2.sha256)
    aside = archive.rename(archive.with_name("moved-away"))  # the store lost v2's bytes
    registry.store.promote("support", 2, actor="t", reason="eval +4%")
    wait_for(lambda: stack.warmup_failures("support@2") >= 2)  # tried, and retried
    for _ in range(5):
        assert stack.served("support") == "support@1"  # traffic stays where it works
    ready = stack.ready()
    assert ready["status"] == "degraded"
    assert "support@production stays on support@1: cannot warm support@2" in ready["reason"]
    assert (
        'loraplex_adapter_warmup_failures_total{adapter="support@2"}'
        in httpx.get(f"{stack.url}/metrics").text
    )

    aside.rename(archive)  # the store is whole again
    wait_for(lambda: stack.served("support") == "support@2")
    wait_for(lambda: stack.ready()["status"] == "ready")
    assert stack.loads("support@2") == 1


def test_a_version_over_this_engines_rank_limit_never_gets_the_alias(
    tmp_path, sqlite_registry, make_adapter, stacks
):
    registry = sqlite_registry
    registry.register("wide", make_adapter(rank=8), actor="t")
    registry.register("wide", make_adapter(rank=16), actor="t")  # the registry allows 16
    registry.store.promote("wide", 1, actor="t")
    stack = RegistryStack(tmp_path, registry, max_rank=8).serve()
    stacks.append(stack)
    registry.store.promote("wide", 2, actor="t")
    wait_for(lambda: stack.warmup_failures("wide@2") >= 1)
    assert stack.served("wide") == "wide@1"
    reason = stack.ready()["reason"]
    assert "wide@production stays on wide@1: cannot warm wide@2" in reason
    assert "rank" in reason


def test_a_new_alias_that_cannot_warm_is_reported_and_tried_on_demand(
    tmp_path, sqlite_registry, artifacts_root, make_adapter, stacks
):
    registry = sqlite_registry
    v1 = registry.register("fresh", make_adapter(), actor="t")
    archive = archive_of(artifacts_root, v1.sha256)
    aside = archive.rename(archive.with_name("moved-away"))
    registry.store.promote("fresh", 1, actor="t")
    stack = RegistryStack(tmp_path, registry).serve()
    stacks.append(stack)
    assert "fresh@production has no target yet: cannot warm fresh@1" in stack.ready()["reason"]
    with pytest.raises(openai.InternalServerError) as info:
        stack.served("fresh")
    assert info.value.status_code == 503 and "fresh@1 is not cached" in str(info.value)
    aside.rename(archive)
    wait_for(lambda: stack.ready()["status"] == "ready")
    assert stack.served("fresh") == "fresh@1"


def test_a_refresh_warms_only_the_aliases_that_changed(
    tmp_path, sqlite_registry, make_adapter, stacks
):
    registry = sqlite_registry
    names = [f"n{i}" for i in range(5)]
    for name in names:
        registry.register(name, make_adapter(), actor="t")
        registry.store.promote(name, 1, actor="t")
    # Fewer engine slots than aliased versions: re-warming them all would churn the engine.
    stack = RegistryStack(tmp_path, registry, max_loaded=2).serve()
    stacks.append(stack)
    loads = {name: stack.loads(f"{name}@1") for name in names}
    assert loads == dict.fromkeys(names, 1)

    def caught_up() -> bool:
        return stack.sample("loraplex_registry_revision") == registry.store.revision()

    for _ in range(3):  # registry changes that move no alias
        registry.register("other", make_adapter(), actor="t")
        wait_for(caught_up)
    assert {name: stack.loads(f"{name}@1") for name in names} == loads
    registry.register("n0", make_adapter(), actor="t")
    registry.store.promote("n0", 2, actor="t")
    wait_for(caught_up)
    assert stack.loads("n0@2") == 1
    assert {name: stack.loads(f"{name}@1") for name in names} == loads


def count_statements(registry: Registry) -> Callable[[], int]:
    seen: list[str] = []
    event.listen(registry.store.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    return lambda: len(seen)


def test_unknown_names_are_remembered_briefly_and_the_404_stays_short(
    tmp_path, sqlite_registry, make_adapter, stacks
):
    registry = sqlite_registry
    for _ in range(30):
        registry.register("big", make_adapter(), actor="t")
    # No polling during the test: only requests reach the database.
    stack = RegistryStack(tmp_path, registry, poll_seconds=600).serve()
    stacks.append(stack)
    statements = count_statements(registry)
    messages = []
    for _ in range(20):
        with pytest.raises(openai.NotFoundError) as info:
            stack.served("no-such-name")
        messages.append(info.value.body["message"])
    assert statements() <= 3  # one lookup, not twenty
    assert len(set(messages)) == 1
    message = messages[0]
    assert "does not exist" in message and "and 11 more" in message and len(message) < 400

    registry.register("no-such-name", make_adapter(), actor="t")
    wait_for(lambda: stack.served("no-such-name@1") == "no-such-name@1", timeout=5)
