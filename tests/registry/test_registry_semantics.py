"""Versions, aliases and the alias-event log on SQLite and PostgreSQL: register, promote, roll back,
history, resolution and its error messages, the routing snapshot, and concurrent writers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlmodel import Session, select

from registry.errors import (
    AdapterNotFoundError,
    AliasNotFoundError,
    ImmutableRecordError,
    InvalidReferenceError,
    NothingToRollBackError,
    VersionNotFoundError,
)
from registry.tables import AliasEventRow, VersionRow


def test_the_release_flow_of_the_issue(registry, make_adapter):
    v1 = registry.register(
        "support", make_adapter(), actor="ana", tags={"dataset": "tickets-2026-10"}
    )
    assert v1.ref == "support@1" and v1.tags == {"dataset": "tickets-2026-10"}
    assert registry.store.promote("support", 1, actor="ana", reason="first release").to_version == 1
    assert registry.register("support", make_adapter(), actor="bo").ref == "support@2"
    registry.store.promote("support", 2, alias="staging", actor="bo")
    move = registry.store.promote("support", 2, actor="bo", reason="eval +4%")
    assert (move.from_version, move.to_version, move.kind) == (1, 2, "promote")
    back = registry.store.rollback("support", actor="cy", reason="complaints")
    assert (back.from_version, back.to_version, back.kind) == (2, 1, "rollback")

    assert registry.store.resolve("support").number == 1
    assert registry.store.resolve("support@production").number == 1
    assert registry.store.resolve("support@staging").number == 2
    assert registry.store.resolve("support@2").sha256 != v1.sha256
    moves = [
        (m.alias, m.from_version, m.to_version, m.actor, m.reason)
        for m in registry.store.history("support")
    ]
    assert moves == [
        ("production", None, 1, "ana", "first release"),
        ("staging", None, 2, "bo", ""),
        ("production", 1, 2, "bo", "eval +4%"),
        ("production", 2, 1, "cy", "complaints"),
    ]
    assert [m.to_version for m in registry.store.history("support", alias="staging")] == [2]
    assert all(m.at.tzinfo is not None for m in registry.store.history("support"))


def test_versions_are_immutable(registry, make_adapter):
    folder = make_adapter()
    first = registry.register("immut", folder, actor="ana", tags={"k": "v"})
    registry.register("immut", make_adapter(), actor="bo")
    again = registry.register("immut", folder, actor="cy")
    assert again.number == 3 and again.sha256 == first.sha256  # same bytes, new version
    assert registry.store.get_version("immut", 1) == first
    registry.store.promote("immut", 1, actor="ana")
    with Session(registry.store.engine) as session:
        row = session.exec(select(VersionRow).where(VersionRow.number == 1)).one()
        row.sha256 = "0" * 64
        with pytest.raises(ImmutableRecordError):
            session.commit()
    with Session(registry.store.engine) as session:
        session.delete(session.exec(select(AliasEventRow)).first())
        with pytest.raises(ImmutableRecordError):
            session.commit()
    assert registry.store.get_version("immut", 1) == first
    assert len(registry.store.history("immut")) == 1


def test_rollback_walks_back_through_promotions(registry, make_adapter):
    for _ in range(3):
        registry.register("walk", make_adapter(), actor="ana")
    for version in (1, 2, 3):
        registry.store.promote("walk", version, actor="ana")
    assert registry.store.rollback("walk", actor="bo").to_version == 2
    assert registry.store.rollback("walk", actor="bo").to_version == 1
    with pytest.raises(NothingToRollBackError, match="no earlier version"):
        registry.store.rollback("walk", actor="bo")
    registry.store.promote("walk", 3, actor="ana")
    assert registry.store.rollback("walk", actor="bo").to_version == 1
    assert registry.store.resolve("walk").number == 1
    with pytest.raises(NothingToRollBackError, match="never been set"):
        registry.store.rollback("walk", alias="canary", actor="bo")


def test_moves_leave_other_names_and_aliases_alone(registry, make_adapter):
    for name in ("left", "right"):
        registry.register(name, make_adapter(), actor="ana")
        registry.register(name, make_adapter(), actor="ana")
        registry.store.promote(name, 1, actor="ana")
        registry.store.promote(name, 2, alias="staging", actor="ana")
    before = registry.store.history("right")
    registry.store.promote("left", 2, actor="bo")
    registry.store.rollback("left", actor="bo")
    registry.store.promote("left", 1, alias="staging", actor="bo")
    snapshot = registry.store.routing_snapshot()
    assert snapshot.find_alias("right", "production") == 1
    assert snapshot.find_alias("right", "staging") == 2
    assert snapshot.find_alias("left", "staging") == 1
    assert registry.store.history("right") == before


def test_promoting_what_does_not_exist_changes_nothing(registry, make_adapter):
    registry.register("exists", make_adapter(), actor="ana")
    registry.store.promote("exists", 1, actor="ana")
    with pytest.raises(VersionNotFoundError, match=r"^exists has no version 7; versions: 1$"):
        registry.store.promote("exists", 7, actor="ana")
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'ghost'; adapters: exists"):
        registry.store.promote("ghost", 1, actor="ana")
    assert registry.store.resolve("exists").number == 1
    assert len(registry.store.history("exists")) == 1


def test_promoting_to_the_current_version_records_nothing(registry, make_adapter):
    registry.register("same", make_adapter(), actor="ana")
    registry.store.promote("same", 1, actor="ana")
    move = registry.store.promote("same", 1, actor="ana")
    assert not move.changed and move.from_version == move.to_version == 1
    assert len(registry.store.history("same")) == 1


def test_not_found_messages_say_what_exists_and_how_to_promote(registry, make_adapter):
    with pytest.raises(AdapterNotFoundError, match="the registry is empty"):
        registry.store.resolve("support")
    registry.register("support", make_adapter(), actor="ana")
    registry.register("support", make_adapter(), actor="ana")
    expected = (
        "support has no alias 'production'; versions: 1, 2. "
        "Promote one: loraplex registry promote support 2"
    )
    with pytest.raises(AliasNotFoundError) as caught:
        registry.store.resolve("support")
    assert str(caught.value) == expected
    registry.store.promote("support", 1, alias="staging", actor="ana")
    with pytest.raises(AliasNotFoundError, match=r"\(aliases: staging -> 1\).* --alias canary$"):
        registry.store.resolve("support@canary")
    with pytest.raises(VersionNotFoundError, match="support has no version 9; versions: 1, 2"):
        registry.store.resolve("support@9")
    with pytest.raises(InvalidReferenceError, match="invalid adapter name"):
        registry.store.resolve("bad name@1")
    with pytest.raises(InvalidReferenceError, match="versions start at 1"):
        registry.store.resolve("support@0")


def test_routing_snapshot_tracks_every_change(registry, make_adapter):
    start = registry.store.routing_snapshot()
    assert start.aliases == {} and start.latest == {}
    registry.register("snap", make_adapter(), actor="ana")
    registry.register("snap", make_adapter(), actor="ana")
    registry.store.promote("snap", 2, actor="ana")
    registry.store.promote("snap", 1, alias="staging", actor="ana")
    snapshot = registry.store.routing_snapshot()
    assert snapshot.revision == start.revision + 4 == registry.store.revision()
    assert snapshot.aliases == {("snap", "production"): 2, ("snap", "staging"): 1}
    assert snapshot.latest == {"snap": 2}
    assert snapshot.changed_at >= start.changed_at
    registry.store.promote("snap", 2, actor="ana")  # unchanged: not a change
    assert registry.store.revision() == snapshot.revision
    assert snapshot.to_json()["aliases"] == {"snap": {"production": 2, "staging": 1}}


def test_concurrent_registrations_never_share_a_number(registry, make_adapter):
    folder = make_adapter()

    def register(i: int) -> int:
        return registry.register("crowd", folder, actor=f"user{i}", tags={"i": str(i)}).number

    with ThreadPoolExecutor(max_workers=50) as pool:
        numbers = list(pool.map(register, range(50)))
    assert sorted(numbers) == list(range(1, 51))
    assert registry.store.get_adapter("crowd").versions == tuple(range(1, 51))
    tags = {registry.store.get_version("crowd", n).tags["i"] for n in range(1, 51)}
    assert tags == {str(i) for i in range(50)}


def test_concurrent_alias_moves_keep_a_consistent_log(registry, make_adapter):
    for _ in range(4):
        registry.register("race", make_adapter(), actor="ana")
    registry.store.promote("race", 1, actor="ana")

    def move(i: int) -> None:
        if i % 3 == 2:
            try:
                registry.store.rollback("race", actor=f"user{i}")
            except NothingToRollBackError:
                pass
        else:
            registry.store.promote("race", 1 + i % 4, actor=f"user{i}")

    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(move, range(36)))
    moves = registry.store.history("race")
    for earlier, later in zip(moves, moves[1:], strict=False):
        assert later.from_version == earlier.to_version
    assert registry.store.resolve("race").number == moves[-1].to_version
