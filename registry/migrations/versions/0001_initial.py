"""Initial schema: adapters, immutable versions, aliases, alias events, the change counter.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _timestamp(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    _create_adapters_and_versions()
    _create_aliases_and_events()
    state = op.create_table(
        "registry_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
        _timestamp("changed_at"),
    )
    op.bulk_insert(state, [{"id": 1, "revision": 0, "changed_at": datetime.now(UTC)}])


def _create_adapters_and_versions() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("base_model", sa.String(512), nullable=False),
        _timestamp("created_at"),
        sa.Column("created_by", sa.String(128), nullable=False),
    )
    op.create_table(
        "adapter_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id"), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("base_model", sa.String(512), nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("alpha", sa.Float, nullable=False),
        sa.Column("target_modules", sa.JSON, nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("lineage", sa.JSON, nullable=False),
        _timestamp("created_at"),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.UniqueConstraint("adapter_id", "number", name="uq_version_number"),
    )
    op.create_index("ix_adapter_versions_sha256", "adapter_versions", ["sha256"])


def _create_aliases_and_events() -> None:
    op.create_table(
        "aliases",
        sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id"), primary_key=True),
        sa.Column("alias", sa.String(32), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        _timestamp("updated_at"),
        sa.ForeignKeyConstraint(
            ["adapter_id", "version"],
            ["adapter_versions.adapter_id", "adapter_versions.number"],
            name="fk_alias_version",
        ),
    )
    op.create_table(
        "alias_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id"), nullable=False),
        sa.Column("alias", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("from_version", sa.Integer, nullable=True),
        sa.Column("to_version", sa.Integer, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        _timestamp("at"),
    )
    op.create_index("ix_alias_events_adapter_alias", "alias_events", ["adapter_id", "alias", "id"])


def downgrade() -> None:
    for table in ("registry_state", "alias_events", "aliases", "adapter_versions", "adapters"):
        op.drop_table(table)
