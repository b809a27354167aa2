"""The fine-tuning tables (sqlmodel): uploaded files, jobs (the queue workers claim from), their
event log and their checkpoints. Migrations 0005 and 0006 create them; these classes must match."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Column, ForeignKey, Index, Integer, String, Text
from sqlmodel import Field, SQLModel

from registry.tables import UTCDateTime, utc_now


def _timestamp() -> Any:
    return Field(default_factory=utc_now, sa_column=Column(UTCDateTime(), nullable=False))


def _optional_timestamp() -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))


class FileRow(SQLModel, table=True):
    __tablename__ = "ft_files"

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    filename: str = Field(sa_column=Column(String(512), nullable=False))
    purpose: str = Field(sa_column=Column(String(32), nullable=False))
    bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    sha256: str = Field(sa_column=Column(String(64), nullable=False))
    blob_sha256: str = Field(sa_column=Column(String(64), nullable=False))
    status: str = Field(sa_column=Column(String(16), nullable=False))
    status_details: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    kind: str | None = Field(default=None, sa_column=Column(String(16)))  # chat, preference
    created_at: datetime = _timestamp()


class JobRow(SQLModel, table=True):
    __tablename__ = "ft_jobs"
    __table_args__ = (
        Index("ix_ft_jobs_status", "status"),
        Index("ix_ft_jobs_fine_tuned_model", "fine_tuned_model"),
    )

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    model: str = Field(sa_column=Column(String(160), nullable=False))
    training_file: str = Field(sa_column=Column(String(64), nullable=False))
    validation_file: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    suffix: str = Field(sa_column=Column(String(64), nullable=False))
    seed: int = Field(sa_column=Column(Integer, nullable=False))
    method: dict = Field(sa_column=Column(JSON, nullable=False))
    job_metadata: dict | None = Field(default=None, sa_column=Column("metadata", JSON))
    status: str = Field(sa_column=Column(String(24), nullable=False))
    fine_tuned_model: str | None = Field(default=None, sa_column=Column(String(160)))  # ft:...
    result_ref: str | None = Field(default=None, sa_column=Column(String(160)))  # its NAME@V
    from_ref: str | None = Field(default=None, sa_column=Column(String(160)))  # continued NAME@V
    trained_tokens: int | None = Field(default=None, sa_column=Column(BigInteger))
    error: dict | None = Field(default=None, sa_column=Column(JSON))
    result_files: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    cancel_requested: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default="0")
    )
    pause_requested: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default="0")
    )
    # The newest checkpoint uploaded to the artifact store: a worker taking the job over resumes
    # from it.
    checkpoint_sha256: str | None = Field(default=None, sa_column=Column(String(64)))
    checkpoint_step: int | None = Field(default=None, sa_column=Column(Integer))
    worker: str | None = Field(default=None, sa_column=Column(String(128)))
    heartbeat_at: datetime | None = _optional_timestamp()
    created_at: datetime = _timestamp()
    started_at: datetime | None = _optional_timestamp()
    finished_at: datetime | None = _optional_timestamp()


class JobEventRow(SQLModel, table=True):
    __tablename__ = "ft_job_events"

    seq: int | None = Field(default=None, primary_key=True)
    job_seq: int = Field(
        sa_column=Column(Integer, ForeignKey("ft_jobs.seq"), nullable=False, index=True)
    )
    level: str = Field(sa_column=Column(String(8), nullable=False))
    type: str = Field(sa_column=Column(String(16), nullable=False))
    message: str = Field(sa_column=Column(Text, nullable=False))
    data: dict | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = _timestamp()


class CheckpointRow(SQLModel, table=True):
    __tablename__ = "ft_job_checkpoints"

    seq: int | None = Field(default=None, primary_key=True)
    job_seq: int = Field(
        sa_column=Column(Integer, ForeignKey("ft_jobs.seq"), nullable=False, index=True)
    )
    step: int = Field(sa_column=Column(Integer, nullable=False))
    metrics: dict = Field(sa_column=Column(JSON, nullable=False))
    blob_sha256: str | None = Field(default=None, sa_column=Column(String(64)))
    created_at: datetime = _timestamp()
