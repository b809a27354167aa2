"""The metadata store: adapters, versions, aliases and alias events in SQL (SQLite or PostgreSQL);
experiments live in registry.experiments, reached as `RegistryStore.experiments`.

Each write is one transaction that first locks the adapter's row (SELECT ... FOR UPDATE on
PostgreSQL, BEGIN IMMEDIATE on SQLite), so version numbers never collide and alias moves
never interleave. It stores sha256s, not bytes (artifacts.py) and validates no files (service.py).
Every session runs inside `database_errors`, so a database outage reaches callers as one
RegistryUnavailableError, never as a driver exception.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, func, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, select

from registry import queries
from registry.db import database_errors, open_engine, safe_url, write_engine
from registry.errors import AdapterRejectedError, NothingToRollBackError
from registry.queries import adapter_not_found, alias_move, require_version, version_record
from registry.records import AdapterSummary, AliasMove, RoutingSnapshot, VersionRecord
from registry.refs import (
    DEFAULT_ALIAS,
    AdapterRef,
    check_actor,
    check_alias,
    check_name,
    check_version,
)
from registry.tables import (
    AdapterRow,
    AliasEventRow,
    AliasRow,
    RegistryStateRow,
    VersionRow,
    utc_now,
)

if TYPE_CHECKING:
    from registry.evaluations import EvaluationStore
    from registry.experiments import ExperimentStore

PROMOTE, ROLLBACK = "promote", "rollback"
# An experiment's outcome where the alias stays put (from = to): history, not a move.
EXPERIMENT = "experiment"


@dataclass(frozen=True, slots=True)
class VersionSpec:
    """What a new version records besides its name, number and creator."""

    sha256: str
    size_bytes: int
    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    # Identities that mean the same model as base_model (registry.base_model.BaseModel.names):
    # a name first registered under one of them accepts this version.
    same_base: frozenset[str] = frozenset()


class RegistryStore:
    """Reads (via registry.queries) and the three writes: add a version, promote, roll back."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._write_engine = write_engine(engine)
        self._where = safe_url(engine)

    @classmethod
    def open(cls, url: str) -> RegistryStore:
        """Connect to `url`, creating or upgrading the schema first."""
        return cls(open_engine(url))

    def close(self) -> None:
        self.engine.dispose()

    @cached_property
    def experiments(self) -> ExperimentStore:
        """A/B experiments on the same database."""
        # Imported here: registry.experiments builds on this module.
        from registry.experiments import ExperimentStore

        return ExperimentStore(self.engine, sessions=self)

    @cached_property
    def evaluations(self) -> EvaluationStore:
        """Versions' evaluations on the same database (registry.evaluations builds on this)."""
        from registry.evaluations import EvaluationStore

        return EvaluationStore(self.engine, sessions=self)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with database_errors(self._where), Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction (on SQLite it takes the write lock at BEGIN)."""
        with (
            database_errors(self._where),
            Session(self._write_engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session

    # Reads: each in its own short session.

    def resolve(self, ref: str | AdapterRef) -> VersionRecord:
        """`NAME` (its production alias), `NAME@7` or `NAME@alias` -> that version's record."""
        with self.read() as session:
            return queries.resolve(session, ref)

    def get_version(self, name: str, number: int) -> VersionRecord:
        with self.read() as session:
            return queries.get_version(session, name, check_version(number))

    def list_adapters(self) -> list[AdapterSummary]:
        with self.read() as session:
            return queries.list_adapters(session)

    def get_adapter(self, name: str) -> AdapterSummary:
        with self.read() as session:
            return queries.get_adapter(session, name)

    def find_base_model(self, name: str) -> str | None:
        """The base model `name` is fixed to, or None for a name not registered yet."""
        with self.read() as session:
            row = queries.find_adapter_row(session, name)
            return row.base_model if row is not None else None

    def history(self, name: str, *, alias: str | None = None) -> list[AliasMove]:
        with self.read() as session:
            return queries.history(session, name, alias=alias)

    def routing_snapshot(self) -> RoutingSnapshot:
        """Every (name, alias) -> version and each name's newest version, with the revision."""
        with self.read() as session:
            return queries.routing_snapshot(session)

    def revision(self) -> int:
        """A number that grows with every committed change: poll this, reload on change."""
        with self.read() as session:
            return queries.current_revision(session)

    def sha256_in_use(self, sha256: str) -> bool:
        with self.read() as session:
            return queries.sha256_in_use(session, sha256)

    def referenced_sha256s(self) -> set[str]:
        """Every sha256 some version row references (what a garbage sweep must keep)."""
        with self.read() as session:
            return queries.referenced_sha256s(session)

    # Writes: each one transaction, under the adapter's row lock.

    def add_version(self, name: str, spec: VersionSpec, *, actor: str) -> VersionRecord:
        """Record the next version of `name` (creating the name, whose base it fixes)."""
        check_name(name)
        check_actor(actor)
        with self.write() as session:
            adapter = self._ensure_adapter(session, name, base_model=spec.base_model, actor=actor)
            same = {adapter.base_model, spec.base_model} <= spec.same_base
            if adapter.base_model != spec.base_model and not same:
                raise AdapterRejectedError(
                    name,
                    [base_mismatch(name, declared=spec.base_model, expected=adapter.base_model)],
                )
            latest = session.exec(
                select(func.max(VersionRow.number)).where(VersionRow.adapter_id == adapter.id)
            ).one()
            row = VersionRow(
                adapter_id=adapter.id,
                number=(latest or 0) + 1,
                sha256=spec.sha256,
                size_bytes=spec.size_bytes,
                base_model=adapter.base_model,  # one name, one recorded base
                rank=spec.rank,
                alpha=spec.alpha,
                target_modules=list(spec.target_modules),
                tags=dict(spec.tags),
                lineage=dict(spec.lineage),
                created_by=actor,
            )
            session.add(row)
            session.flush()
            bump_revision(session, at=row.created_at)
            return version_record(name, row)

    def promote(
        self, name: str, version: int, *, alias: str = DEFAULT_ALIAS, actor: str, reason: str = ""
    ) -> AliasMove:
        """Point `alias` of `name` at `version`; a no-op (changed=False) if it already does."""
        check_version(version)
        check_alias(alias)
        check_actor(actor)
        with self.write() as session:
            adapter = self._lock_adapter(session, name)
            require_version(session, adapter, version)
            current = session.get(AliasRow, (adapter.id, alias))
            if current is not None and current.version == version:
                return AliasMove(
                    name=name,
                    alias=alias,
                    kind=PROMOTE,
                    from_version=version,
                    to_version=version,
                    actor=actor,
                    reason=reason,
                    at=utc_now(),
                    changed=False,
                )
            return move_alias(
                session, adapter, alias=alias, to=version, kind=PROMOTE, actor=actor, reason=reason
            )

    def rollback(
        self, name: str, *, alias: str = DEFAULT_ALIAS, actor: str, reason: str = ""
    ) -> AliasMove:
        """Move `alias` back to the version it held before its last promotion still in effect.

        Promotions push onto the alias's history and rollbacks pop, so promote 1, 2, 3 then
        rollback, rollback gives 2, then 1; a further rollback has nothing to return to.
        """
        check_alias(alias)
        check_actor(actor)
        with self.write() as session:
            adapter = self._lock_adapter(session, name)
            events = session.exec(
                select(AliasEventRow)
                .where(AliasEventRow.adapter_id == adapter.id, AliasEventRow.alias == alias)
                .order_by(AliasEventRow.id)
            ).all()
            stack = effective_history(events)
            if len(stack) < 2:
                raise NothingToRollBackError(_nothing_to_roll_back(name, alias, stack))
            return move_alias(
                session,
                adapter,
                alias=alias,
                to=stack[-2],
                kind=ROLLBACK,
                actor=actor,
                reason=reason,
            )

    def _ensure_adapter(
        self, session: Session, name: str, *, base_model: str, actor: str
    ) -> AdapterRow:
        insert = postgresql_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        session.execute(
            insert(AdapterRow.__table__)
            .values(name=name, base_model=base_model, created_at=utc_now(), created_by=actor)
            .on_conflict_do_nothing(index_elements=["name"])
        )
        return self._lock_adapter(session, name)

    def _lock_adapter(self, session: Session, name: str) -> AdapterRow:
        return lock_adapter(session, name)


def lock_adapter(session: Session, name: str) -> AdapterRow:
    """The adapter's row, locked until the transaction ends (every alias move takes it)."""
    check_name(name)
    row = session.exec(select(AdapterRow).where(AdapterRow.name == name).with_for_update()).first()
    if row is None:
        raise adapter_not_found(session, name)
    return row


def effective_history(events: list[AliasEventRow]) -> list[int]:
    """Versions the alias held, oldest first, with rolled-back promotions removed.

    "experiment" entries record an outcome without a move, so they are not part of it.
    """
    stack: list[int] = []
    for event in events:
        if event.kind == EXPERIMENT:
            continue
        if event.kind == ROLLBACK and stack:
            stack.pop()
        else:
            stack.append(event.to_version)
    return stack


def base_mismatch(name: str, *, declared: str, expected: str) -> str:
    return (
        f"base model mismatch: the adapter was trained on {declared!r} but {name}'s versions "
        f"use {expected!r}"
    )


def move_alias(
    session: Session,
    adapter: AdapterRow,
    *,
    alias: str,
    to: int,
    kind: str,
    actor: str,
    reason: str,
    details: Mapping[str, Any] | None = None,
) -> AliasMove:
    """Point the alias at `to` (the adapter row locked), log it and bump the revision.

    kind "experiment" (to = the current version) logs an outcome without moving anything.
    """
    now = utc_now()
    row = session.get(AliasRow, (adapter.id, alias))
    previous = row.version if row is not None else None
    if row is None:
        row = AliasRow(adapter_id=adapter.id, alias=alias, version=to, updated_at=now)
    elif row.version != to:
        row.version, row.updated_at = to, now
    session.add(row)
    event = AliasEventRow(
        adapter_id=adapter.id,
        alias=alias,
        kind=kind,
        from_version=previous,
        to_version=to,
        actor=actor,
        reason=reason,
        at=now,
        details=dict(details) if details is not None else None,
    )
    session.add(event)
    bump_revision(session, at=now)
    return alias_move(adapter.name, event)


def bump_revision(session: Session, *, at: datetime) -> None:
    session.execute(
        update(RegistryStateRow)
        .where(RegistryStateRow.id == 1)
        .values(revision=RegistryStateRow.revision + 1, changed_at=at)
    )


def _nothing_to_roll_back(name: str, alias: str, stack: list[int]) -> str:
    if not stack:
        return f"{name}@{alias} has never been set; nothing to roll back"
    return (
        f"{name}@{alias} -> {stack[-1]} has no earlier version to roll back to; "
        f"promote one instead: loraplex registry promote {name} VERSION"
        + (f" --alias {alias}" if alias != DEFAULT_ALIAS else "")
    )
