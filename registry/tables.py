"""The registry's SQL tables (sqlmodel): adapters, immutable versions, aliases as rows, the
append-only alias-event log, the change counter servers poll, and experiments (their rows,
event log, per-user and per-variant aggregates, completions awaiting feedback, replica states)
and versions' evaluations.
Schema changes go through a migration in registry/migrations; these classes must match the
newest one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
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
    # What decided the move (an experiment's id and decision); NULL for plain promotions.
    details: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class RegistryStateRow(SQLModel, table=True):
    """A single row whose revision grows with every committed change (for cheap polling)."""

    __tablename__ = "registry_state"

    id: int = Field(default=1, primary_key=True)
    revision: int = Field(sa_column=Column(BigInteger, nullable=False))
    changed_at: datetime = _timestamp()


def _optional_timestamp() -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))


def _count(big: bool = False) -> Any:
    return Field(default=0, sa_column=Column(BigInteger if big else Integer, nullable=False))


def _sum() -> Any:
    return Field(default=0.0, sa_column=Column(Float, nullable=False))


class ExperimentRow(SQLModel, table=True):
    """One A/B experiment on an adapter name.

    `running_adapter_id` equals `adapter_id` while it runs and is NULL once it ended: a UNIQUE
    column (NULLs never collide, on SQLite and PostgreSQL alike) allows one running experiment
    per adapter without a partial index.
    """

    __tablename__ = "experiments"

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(
        sa_column=Column(Integer, ForeignKey("adapters.id"), nullable=False, index=True)
    )
    running_adapter_id: int | None = Field(
        default=None, sa_column=Column(Integer, nullable=True, unique=True)
    )
    status: str = Field(sa_column=Column(String(16), nullable=False))
    salt: str = Field(sa_column=Column(String(32), nullable=False))
    hash_version: int = Field(sa_column=Column(Integer, nullable=False))
    variants: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    ramp: list[float] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    step: int = Field(sa_column=Column(Integer, nullable=False))
    step_started_at: datetime = _timestamp()
    config: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    analysis: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    decision: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    analysed_at: datetime | None = _optional_timestamp()
    created_at: datetime = _timestamp()
    created_by: str = Field(sa_column=Column(String(128), nullable=False))
    ended_at: datetime | None = _optional_timestamp()
    ended_by: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    end_reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class ExperimentEventRow(SQLModel, table=True):
    """Start, each ramp step and the end of an experiment; rows are only ever appended."""

    __tablename__ = "experiment_events"
    __table_args__ = (Index("ix_experiment_events_experiment", "experiment_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    experiment_id: int = Field(
        sa_column=Column(Integer, ForeignKey("experiments.id"), nullable=False)
    )
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    step: int = Field(sa_column=Column(Integer, nullable=False))
    actor: str = Field(sa_column=Column(String(128), nullable=False))
    reason: str = Field(sa_column=Column(Text, nullable=False))
    details: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    at: datetime = _timestamp()


class ExperimentUserRow(SQLModel, table=True):
    """One user of an experiment's analysed slice: what happened since their first exposure.

    `analysed` is set once the user's window closed and the decision procedures consumed it;
    `error_counted` once their first error fed the error-rate test.
    """

    __tablename__ = "experiment_users"
    __table_args__ = (
        Index("ix_experiment_users_closing", "experiment_id", "analysed", "first_seen_at"),
        Index(
            "ix_experiment_users_first_error", "experiment_id", "error_counted", "first_error_at"
        ),
    )

    experiment_id: int = Field(
        sa_column=Column(Integer, ForeignKey("experiments.id"), primary_key=True)
    )
    user_hash: str = Field(sa_column=Column(String(32), primary_key=True))
    variant: int = Field(sa_column=Column(Integer, nullable=False))
    first_seen_at: datetime = _timestamp()
    requests: int = _count()
    errors: int = _count()
    slow: int = _count()
    output_tokens: int = _count(big=True)
    feedback_sum: float = _sum()
    feedback_count: int = _count()
    first_error_at: datetime | None = _optional_timestamp()
    analysed: bool = Field(default=False, sa_column=Column(Boolean, nullable=False))
    error_counted: bool = Field(default=False, sa_column=Column(Boolean, nullable=False))


class ExperimentCounterRow(SQLModel, table=True):
    """Every request of one variant (keyed, unkeyed and outside the analysed slice alike)."""

    __tablename__ = "experiment_counters"

    experiment_id: int = Field(
        sa_column=Column(Integer, ForeignKey("experiments.id"), primary_key=True)
    )
    variant: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    requests: int = _count(big=True)
    errors: int = _count(big=True)
    slow: int = _count(big=True)
    output_tokens: int = _count(big=True)
    latency_seconds_sum: float = _sum()
    ttft_seconds_sum: float = _sum()
    unkeyed_requests: int = _count(big=True)
    unanalysed_requests: int = _count(big=True)
    feedback_count: int = _count(big=True)
    feedback_sum: float = _sum()


class ExperimentCompletionRow(SQLModel, table=True):
    """A completion served inside an experiment, kept until feedback on it may no longer come."""

    __tablename__ = "experiment_completions"

    completion_id: str = Field(sa_column=Column(String(64), primary_key=True))
    experiment_id: int = Field(
        sa_column=Column(Integer, ForeignKey("experiments.id"), nullable=False)
    )
    variant: int = Field(sa_column=Column(Integer, nullable=False))
    user_hash: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    analysed: bool = Field(sa_column=Column(Boolean, nullable=False))
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(UTCDateTime(), nullable=False, index=True)
    )
    score: float | None = Field(default=None, sa_column=Column(Float, nullable=True))
    rated_at: datetime | None = _optional_timestamp()


class ExperimentReplicaRow(SQLModel, table=True):
    """What each serving replica last said about an experiment (warming, serving, failed)."""

    __tablename__ = "experiment_replicas"

    experiment_id: int = Field(
        sa_column=Column(Integer, ForeignKey("experiments.id"), primary_key=True)
    )
    replica_id: str = Field(sa_column=Column(String(64), primary_key=True))
    state: str = Field(sa_column=Column(String(16), nullable=False))
    reason: str = Field(sa_column=Column(Text, nullable=False))
    updated_at: datetime = _timestamp()


class EvaluationRow(SQLModel, table=True):
    """One evaluation of a version against a baseline; rows are only ever appended."""

    __tablename__ = "version_evaluations"
    __table_args__ = (
        ForeignKeyConstraint(
            ["adapter_id", "version"],
            ["adapter_versions.adapter_id", "adapter_versions.number"],
            name="fk_evaluation_version",
        ),
        Index("ix_version_evaluations_version", "adapter_id", "version", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(sa_column=Column(Integer, ForeignKey("adapters.id"), nullable=False))
    version: int = Field(sa_column=Column(Integer, nullable=False))
    baseline: str = Field(sa_column=Column(String(128), nullable=False))
    dataset_sha256: str = Field(sa_column=Column(String(64), nullable=False))
    metrics: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = _timestamp()
    created_by: str = Field(sa_column=Column(String(128), nullable=False))


def _refuse_change(mapper: Any, connection: Any, target: Any) -> None:
    raise ImmutableRecordError(f"{type(target).__name__} rows are written once and never changed")


for _table in (VersionRow, AliasEventRow, ExperimentEventRow, EvaluationRow):
    event.listen(_table, "before_update", _refuse_change)
    event.listen(_table, "before_delete", _refuse_change)
