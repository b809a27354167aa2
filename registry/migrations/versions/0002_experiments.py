"""Experiments: their rows and event log, per-user and per-variant aggregates, completions awaiting
feedback, replica states; alias events gain `details` (what decided a move; NULL before).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _experiment(*, primary_key: bool = False) -> sa.Column:
    return sa.Column(
        "experiment_id",
        sa.Integer,
        sa.ForeignKey("experiments.id"),
        primary_key=primary_key,
        nullable=False,
    )


def _count(name: str, *, big: bool = True) -> sa.Column:
    return sa.Column(name, sa.BigInteger if big else sa.Integer, nullable=False)


def upgrade() -> None:
    with op.batch_alter_table("alias_events") as batch:
        batch.add_column(sa.Column("details", sa.JSON, nullable=True))
    _create_experiments()
    _create_experiment_users()
    _create_counters_completions_replicas()


def _create_experiments() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id"), nullable=False),
        sa.Column("running_adapter_id", sa.Integer, nullable=True, unique=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("salt", sa.String(32), nullable=False),
        sa.Column("hash_version", sa.Integer, nullable=False),
        sa.Column("variants", sa.JSON, nullable=False),
        sa.Column("ramp", sa.JSON, nullable=True),
        sa.Column("step", sa.Integer, nullable=False),
        _timestamp("step_started_at"),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("analysis", sa.JSON, nullable=False),
        sa.Column("decision", sa.JSON, nullable=False),
        _timestamp("analysed_at", nullable=True),
        _timestamp("created_at"),
        sa.Column("created_by", sa.String(128), nullable=False),
        _timestamp("ended_at", nullable=True),
        sa.Column("ended_by", sa.String(128), nullable=True),
        sa.Column("end_reason", sa.Text, nullable=True),
    )
    op.create_index("ix_experiments_adapter_id", "experiments", ["adapter_id"])
    op.create_table(
        "experiment_events",
        sa.Column("id", sa.Integer, primary_key=True),
        _experiment(),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("details", sa.JSON, nullable=False),
        _timestamp("at"),
    )
    op.create_index("ix_experiment_events_experiment", "experiment_events", ["experiment_id", "id"])


def _create_experiment_users() -> None:
    op.create_table(
        "experiment_users",
        _experiment(primary_key=True),
        sa.Column("user_hash", sa.String(32), primary_key=True),
        sa.Column("variant", sa.Integer, nullable=False),
        _timestamp("first_seen_at"),
        _count("requests", big=False),
        _count("errors", big=False),
        _count("slow", big=False),
        _count("output_tokens"),
        sa.Column("feedback_sum", sa.Float, nullable=False),
        _count("feedback_count", big=False),
        _timestamp("first_error_at", nullable=True),
        sa.Column("analysed", sa.Boolean, nullable=False),
        sa.Column("error_counted", sa.Boolean, nullable=False),
    )
    op.create_index(
        "ix_experiment_users_closing",
        "experiment_users",
        ["experiment_id", "analysed", "first_seen_at"],
    )
    op.create_index(
        "ix_experiment_users_first_error",
        "experiment_users",
        ["experiment_id", "error_counted", "first_error_at"],
    )


def _create_counters_completions_replicas() -> None:
    op.create_table(
        "experiment_counters",
        _experiment(primary_key=True),
        sa.Column("variant", sa.Integer, primary_key=True, autoincrement=False),
        *(_count(n) for n in ("requests", "errors", "slow", "output_tokens")),
        sa.Column("latency_seconds_sum", sa.Float, nullable=False),
        sa.Column("ttft_seconds_sum", sa.Float, nullable=False),
        _count("unkeyed_requests"),
        _count("unanalysed_requests"),
        _count("feedback_count"),
        sa.Column("feedback_sum", sa.Float, nullable=False),
    )
    op.create_table(
        "experiment_completions",
        sa.Column("completion_id", sa.String(64), primary_key=True),
        _experiment(),
        sa.Column("variant", sa.Integer, nullable=False),
        sa.Column("user_hash", sa.String(32), nullable=True),
        sa.Column("analysed", sa.Boolean, nullable=False),
        _timestamp("created_at"),
        sa.Column("score", sa.Float, nullable=True),
        _timestamp("rated_at", nullable=True),
    )
    op.create_index(
        "ix_experiment_completions_created_at", "experiment_completions", ["created_at"]
    )
    op.create_table(
        "experiment_replicas",
        _experiment(primary_key=True),
        sa.Column("replica_id", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        _timestamp("updated_at"),
    )


def downgrade() -> None:
    for table in (
        "experiment_replicas",
        "experiment_completions",
        "experiment_counters",
        "experiment_users",
        "experiment_events",
        "experiments",
    ):
        op.drop_table(table)
    with op.batch_alter_table("alias_events") as batch:
        batch.drop_column("details")
