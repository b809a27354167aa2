"""Alembic migration scripts of the registry schema, run in code by registry.db (and by
`loraplex registry migrate`, the step a deployment runs before it rolls the servers).

Policy: expand/contract, so a rolling upgrade never breaks the release still running.

- Every migration is **expand** unless it says otherwise: it only adds (tables, nullable or
  defaulted columns, indexes, rows), so the previous release keeps reading and writing the
  database while the new one rolls out. An expand migration leaves the compatibility row alone.
- The database keeps, next to alembic's `alembic_version`, one row `loraplex_schema_compat
  .min_reader`: the oldest code schema revision that may still use it. A server whose newest
  revision is R accepts a database at revision D when D == R; when D is older it upgrades it
  (one migrator at a time: a PostgreSQL advisory lock, SQLite's write lock); when D is newer
  (unknown to R) it accepts it as is, never upgrading or downgrading, only if min_reader is a
  revision R knows, and otherwise refuses with a message naming D, min_reader and R.
- A **contract** step (drop or rename a column or table, add NOT NULL without a default, change
  a meaning) is done over two releases:
  1. release N stops using the old thing (reads and writes only the new one) and ships an
     expand migration, empty if need be, so that its revision identifies code that no longer
     needs the old thing;
  2. release N+1 ships the contract migration, which removes the old thing and calls
     `require_readers_from("<release N's revision>")` in `upgrade()` (and restores the previous
     value in `downgrade()`). Servers of release N run on N+1's schema during the roll; older
     ones refuse it instead of failing on a missing column.
  Never contract in the release that stops using the thing: its predecessor is still running.
- Data moves that take long (backfills) belong to their own expand migration or a job, not to
  a contract step.
"""

from __future__ import annotations

COMPAT_TABLE = "loraplex_schema_compat"


def require_readers_from(revision: str) -> None:
    """Inside a contract migration's `upgrade()`: code older than `revision` may no longer use
    the database (it refuses it, naming both revisions)."""
    import sqlalchemy as sa
    from alembic import op

    op.execute(
        sa.text(f"UPDATE {COMPAT_TABLE} SET min_reader = :revision").bindparams(revision=revision)
    )
