"""The registry's SQL tables (sqlmodel): adapters, immutable versions, aliases as rows, the
append-only alias-event log and the change counter servers poll. Schema changes go through a
migration in registry/migrations; these classes must match the newest one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from registry.errors import ImmutableRecordError


class UTCDateTime(TypeDecorator):
    """A timestamp that is timezone-aware UTC on the way in and out, on SQLite too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)


def _timestamp() -> Any:
    return Field(default_factory=utc_now, sa_column=Column(UTCDateTime(), nullable=False))


class AdapterRow(SQLModel, table=True):
    __tablename__ = "adapters"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    base_model: str = Field(sa_column=Column(String(512), nullable=False))
    created_at: datetime = _timestamp()
    created_by: str = Field(sa_column=Column(String(128), nullable=False))


class VersionRow(SQLModel, table=True):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "number", name="uq_version_number"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(sa_column=Column(Integer, ForeignKey("adapters.id"), nullable=False))
    number: int = Field(sa_column=Column(Integer, nullable=False))
    sha256: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    base_model: str = Field(sa_column=Column(String(512), nullable=False))
    rank: int = Field(sa_column=Column(Integer, nullable=False))
    alpha: float = Field(sa_column=Column(Float, nullable=False))
    target_modules: list[str] = Field(sa_column=Column(JSON, nullable=False))
    tags: dict[str, str] = Field(sa_column=Column(JSON, nullable=False))
    lineage: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = _timestamp()
    created_by: str = Field(sa_column=Column(String(128), nullable=False))


class AliasRow(SQLModel, table=True):
    """`(adapter, alias) -> version`; the composite key makes an alias point inside its adapter."""

    __tablename__ = "aliases"
    __table_args__ = (
        ForeignKeyConstraint(
            ["adapter_id", "version"],
            ["adapter_versions.adapter_id", "adapter_versions.number"],
            name="fk_alias_version",
        ),
    )

    adapter_id: int = Field(sa_column=Column(Integer, ForeignKey("adapters.id"), primary_key=True))
    alias: str = Field(sa_column=Column(String(32), primary_key=True))
    version: int = Field(sa_column=Column(Integer, nullable=False))
    updated_at: datetime = _timestamp()


class AliasEventRow(SQLModel, table=True):
    """One alias move; rows are only ever appended."""

    __tablename__ = "alias_events"
    __table_args__ = (Index("ix_alias_events_adapter_alias", "adapter_id", "alias", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(sa_column=Column(Integer, ForeignKey("adapters.id"), nullable=False))
    alias: str = Field(sa_column=Column(String(32), nullable=False))
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    from_version: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    to_version: int = Field(sa_column=Column(Integer, nullable=False))
    actor: str = Field(sa_column=Column(String(128), nullable=False))
    reason: str = Field(sa_column=Column(Text, nullable=False))
    at: datetime = _timestamp()


class RegistryStateRow(SQLModel, table=True):
    """A single row whose revision grows with every committed change (for cheap polling)."""

    __tablename__ = "registry_state"

    id: int = Field(default=1, primary_key=True)
    revision: int = Field(sa_column=Column(BigInteger, nullable=False))
    changed_at: datetime = _timestamp()


def _refuse_change(mapper: Any, connection: Any, target: Any) -> None:
    raise ImmutableRecordError(f"{type(target).__name__} rows are written once and never changed")


for _table in (VersionRow, AliasEventRow):
    event.listen(_table, "before_update", _refuse_change)
    event.listen(_table, "before_delete", _refuse_change)
