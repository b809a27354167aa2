"""Schema compatibility row: `loraplex_schema_compat.min_reader`, the oldest code revision that
may use this database (expand/contract policy: registry/migrations/__init__.py). Expand.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from registry.migrations import COMPAT_TABLE

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        COMPAT_TABLE,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("min_reader", sa.String(32), nullable=False),
    )
    # Only adds a table: code at 0003 could still use this schema.
    op.bulk_insert(table, [{"id": 1, "min_reader": "0003"}])


def downgrade() -> None:
    op.drop_table(COMPAT_TABLE)
