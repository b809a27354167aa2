"""Fine-tuning: uploaded files, jobs (a queue workers claim with row locks), job events and
checkpoints. Expand: only adds tables.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from registry.tables import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ft_files",
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("blob_sha256", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_details", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "ft_jobs",
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("model", sa.String(160), nullable=False),
        sa.Column("training_file", sa.String(64), nullable=False),
        sa.Column("validation_file", sa.String(64), nullable=True),
        sa.Column("suffix", sa.String(64), nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("method", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=True),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("fine_tuned_model", sa.String(160), nullable=True),
        sa.Column("trained_tokens", sa.BigInteger, nullable=True),
        sa.Column("error", sa.JSON, nullable=True),
        sa.Column("result_files", sa.JSON, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default="0"),
        sa.Column("worker", sa.String(128), nullable=True),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_ft_jobs_status", "ft_jobs", ["status"])
    for table in ("ft_job_events", "ft_job_checkpoints"):
        columns = (
            [sa.Column("level", sa.String(8), nullable=False),
             sa.Column("type", sa.String(16), nullable=False),
             sa.Column("message", sa.Text, nullable=False),
             sa.Column("data", sa.JSON, nullable=True)]
            if table == "ft_job_events"
            else [sa.Column("step", sa.Integer, nullable=False),
                  sa.Column("metrics", sa.JSON, nullable=False)]
        )  # fmt: skip
        op.create_table(
            table,
            sa.Column("seq", sa.Integer, primary_key=True),
            sa.Column("job_seq", sa.Integer, sa.ForeignKey("ft_jobs.seq"), nullable=False),
            *columns,
            sa.Column("created_at", UTCDateTime(), nullable=False),
        )
        op.create_index(f"ix_{table}_job_seq", table, ["job_seq"])


def downgrade() -> None:
    for table in ("ft_job_checkpoints", "ft_job_events"):
        op.drop_index(f"ix_{table}_job_seq", table_name=table)
        op.drop_table(table)
    op.drop_index("ix_ft_jobs_status", table_name="ft_jobs")
    op.drop_table("ft_jobs")
    op.drop_table("ft_files")
