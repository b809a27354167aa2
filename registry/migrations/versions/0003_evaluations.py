"""Evaluations of adapter versions: append-only rows (version, baseline, dataset hash, metrics).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "version_evaluations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("baseline", sa.String(128), nullable=False),
        sa.Column("dataset_sha256", sa.String(64), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id", "version"],
            ["adapter_versions.adapter_id", "adapter_versions.number"],
            name="fk_evaluation_version",
        ),
    )
    op.create_index(
        "ix_version_evaluations_version", "version_evaluations", ["adapter_id", "version", "id"]
    )


def downgrade() -> None:
    op.drop_table("version_evaluations")
