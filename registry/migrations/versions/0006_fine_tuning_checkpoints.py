"""Fine-tuning: a checkpoint's uploaded folder (its blob in the artifact store), a job's latest
uploaded checkpoint (where a worker taking it over resumes), a pause flag, the registry
version a `ft:` model id names and the one a job continues, and a file's kind (chat or
preference). Expand: only adds nullable or defaulted columns.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("ft_job_checkpoints", sa.Column("blob_sha256", sa.String(64), nullable=True))
    op.add_column("ft_jobs", sa.Column("checkpoint_sha256", sa.String(64), nullable=True))
    op.add_column("ft_jobs", sa.Column("checkpoint_step", sa.Integer, nullable=True))
    op.add_column("ft_jobs", sa.Column("result_ref", sa.String(160), nullable=True))
    op.add_column("ft_jobs", sa.Column("from_ref", sa.String(160), nullable=True))
    op.add_column("ft_files", sa.Column("kind", sa.String(16), nullable=True))
    op.create_index("ix_ft_jobs_fine_tuned_model", "ft_jobs", ["fine_tuned_model"])
    op.add_column(
        "ft_jobs",
        sa.Column("pause_requested", sa.Boolean, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_index("ix_ft_jobs_fine_tuned_model", table_name="ft_jobs")
    with op.batch_alter_table("ft_jobs") as batch:
        batch.drop_column("from_ref")
        batch.drop_column("result_ref")
        batch.drop_column("pause_requested")
        batch.drop_column("checkpoint_step")
        batch.drop_column("checkpoint_sha256")
    with op.batch_alter_table("ft_files") as batch:
        batch.drop_column("kind")
    with op.batch_alter_table("ft_job_checkpoints") as batch:
        batch.drop_column("blob_sha256")
