"""Alembic environment for the registry: runs on the connection registry.db hands over.

There is no alembic.ini; registry.db builds the Config in code and passes an open connection
(already inside its transaction, under the migration lock) as `config.attributes["connection"]`.
"""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import registry.tables  # noqa: F401 - registers the tables on SQLModel.metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("registry migrations run through registry.db.upgrade_schema only")

context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
