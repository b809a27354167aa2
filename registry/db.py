"""Opening the metadata database: the engine (SQLite or PostgreSQL) and its schema migrations.

`open_engine` brings an older database to this code's schema with Alembic, run in code from the
scripts shipped in registry/migrations (a fresh file is created, an old one upgraded), and
accepts a newer one as is when its compatibility row allows this code (expand/contract policy:
registry/migrations/__init__.py). One migrator at a time: a PostgreSQL advisory lock, SQLite's
write lock. SQLite write transactions start with BEGIN IMMEDIATE so concurrent writers queue.
`database_errors` is the one place where driver errors become the registry's own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import StaticPool

from registry.errors import RegistryDatabaseError, RegistryUnavailableError
from registry.migrations import COMPAT_TABLE

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# The newest migration's revision; tests check it against the scripts. Lets `open_engine` skip
# importing Alembic when the schema is already current (most CLI calls, every server start).
SCHEMA_HEAD = "0006"
SQLITE_BUSY_TIMEOUT_S = 30.0
_MIGRATION_LOCK_KEY = 0x6C6F7261  # pg_advisory_xact_lock key: one migrator at a time
SUPPORTED_DATABASES = ("sqlite:///PATH", "postgresql+psycopg://USER:PASSWORD@HOST/DB")

log = logging.getLogger(__name__)


def open_engine(url: str) -> Engine:
    """An engine for `url` whose schema this code can use: at SCHEMA_HEAD (created or upgraded
    as needed), or newer and declared readable by this code."""
    engine = create_registry_engine(url)
    try:
        if current_revision(engine) != SCHEMA_HEAD:
            state = schema_state(engine)  # a newer schema needs no write lock to be accepted
            if state.status == "incompatible":
                raise RegistryDatabaseError(state.refusal())
            if state.status == "newer":
                _log_newer(state)
            else:
                migrate(engine)
    except (OperationalError, InterfaceError, PoolTimeoutError) as e:
        engine.dispose()
        raise RegistryUnavailableError(
            f"cannot open registry database {_safe(url)}: {_reason(e)}"
        ) from e
    except SQLAlchemyError as e:
        engine.dispose()
        raise RegistryDatabaseError(f"cannot open registry database {_safe(url)}: {e}") from e
    except BaseException:
        engine.dispose()
        raise
    return engine


def create_registry_engine(url: str) -> Engine:
    """An engine without migrations; SQLite gets WAL, foreign keys and a busy timeout."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise RegistryDatabaseError(
            f"invalid registry database URL {url!r}; expected one of {', '.join(SUPPORTED_DATABASES)}"
        ) from e
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, database=parsed.database)
    if parsed.get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    raise RegistryDatabaseError(
        f"unsupported registry database {parsed.get_backend_name()!r} in {_safe(url)}; "
        f"expected one of {', '.join(SUPPORTED_DATABASES)}"
    )


@contextmanager
def database_errors(where: str) -> Iterator[None]:
    """Turn the driver's failures inside the block into RegistryUnavailableError.

    Every way a database stops answering (refused or dropped connections, a stopped server, a
    pool timeout, an unreadable or corrupt SQLite file) reaches callers as that one error, so
    the HTTP layer answers 503 and the CLI prints one line. Constraint violations and values
    that do not fit a column are not an outage: they pass through (the store's checks prevent
    them; one reaching here is a bug).
    """
    try:
        yield
    except (IntegrityError, DataError):
        raise
    except (DBAPIError, PoolTimeoutError) as e:
        raise RegistryUnavailableError(
            f"the registry database {where} is unavailable: {_reason(e)}"
        ) from e


def safe_url(engine: Engine) -> str:
    """The engine's URL with any password hidden, for messages."""
    return engine.url.render_as_string(hide_password=True)


def _reason(error: Exception) -> str:
    """The driver's own message on one line (SQLAlchemy's adds SQL and a docs link)."""
    reason = " ".join(str(getattr(error, "orig", None) or error).split())
    return reason if len(reason) <= 300 else reason[:297] + "..."


def write_engine(engine: Engine) -> Engine:
    """The engine to use for transactions that write: on SQLite they take the write lock first."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(sqlite_begin="IMMEDIATE")
    return engine


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


@dataclass(frozen=True)
class SchemaState:
    """Where a database's schema stands for this code (SCHEMA_HEAD)."""

    revision: str | None  # alembic's revision of the database; None: no schema yet
    min_reader: str | None  # oldest code revision that may use it; None before 0004
    known: bool  # this code ships the database's revision

    @property
    def status(self) -> str:
        """current | behind (this code upgrades it) | newer (usable as is) | incompatible."""
        if self.revision == SCHEMA_HEAD:
            return "current"
        if self.revision is None or self.known:
            return "behind"
        return "newer" if self.min_reader in known_revisions() else "incompatible"

    def refusal(self) -> str:
        """Why this code may not use a database in status "incompatible"."""
        if self.min_reader is None:
            needs, why = "does not say which releases can use it", "an unknown migration"
        else:
            needs = f"needs loraplex code at schema {self.min_reader} or newer"
            why = "a newer loraplex's contract step"
        return (
            f"the registry database is at schema {self.revision}, which {needs}; this loraplex "
            f"knows schema up to {SCHEMA_HEAD}. It was changed by {why}: run a loraplex that "
            f"knows schema {self.revision} (the database was left unchanged)"
        )


@dataclass(frozen=True)
class Migration:
    """What `migrate` did: from and to revisions (equal when there was nothing to do)."""

    before: SchemaState
    after: SchemaState

    @property
    def changed(self) -> bool:
        return self.before.revision != self.after.revision

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.before.revision,
            "to": self.after.revision,
            "head": SCHEMA_HEAD,
            "min_reader": self.after.min_reader,
            "status": self.after.status,
            "changed": self.changed,
        }


@cache
def known_revisions() -> frozenset[str]:
    """Every revision this code's migration scripts define."""
    from alembic.script import ScriptDirectory

    return frozenset(
        s.revision for s in ScriptDirectory.from_config(_alembic_config()).walk_revisions()
    )


def schema_state(engine: Engine) -> SchemaState:
    """The database's schema revision and compatibility row, as this code sees them."""
    with engine.connect() as conn:
        return _read_state(conn)


def migrate(engine: Engine, *, revision: str = "head") -> Migration:
    """Bring the schema to `revision` if this code ships it; leave a newer compatible one as is.

    Runs in one write transaction under the migration lock, and decides there (another replica
    may have migrated, even to a newer release, while this one waited). Raises
    RegistryDatabaseError for a newer schema this code may not use, naming both revisions.
    """
    from alembic import command
    from alembic.util import CommandError

    config = _alembic_config()
    with write_engine(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        before = _read_state(conn)
        if before.status == "incompatible":
            raise RegistryDatabaseError(before.refusal())
        if before.status == "newer":
            _log_newer(before)
            return Migration(before, before)
        config.attributes["connection"] = conn
        try:
            command.upgrade(config, revision)
        except CommandError as e:
            raise RegistryDatabaseError(
                f"cannot migrate the registry database from schema {before.revision} "
                f"(this loraplex knows schema up to {SCHEMA_HEAD}): {e}"
            ) from e
        return Migration(before, _read_state(conn))


def upgrade_schema(engine: Engine, *, revision: str = "head") -> None:
    """`migrate`, for callers that only need it done."""
    migrate(engine, revision=revision)


def _log_newer(state: SchemaState) -> None:
    log.info(
        "registry schema %s is newer than this loraplex's %s and declared usable by it "
        "(min reader %s): using it as is",
        state.revision, SCHEMA_HEAD, state.min_reader,
    )  # fmt: skip


def _alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _read_state(conn: Connection) -> SchemaState:
    tables = set(inspect(conn).get_table_names())
    revision = None
    if "alembic_version" in tables:
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    min_reader = None
    if COMPAT_TABLE in tables:
        min_reader = conn.execute(text(f"SELECT min_reader FROM {COMPAT_TABLE}")).scalar()
    known = revision is None or revision == SCHEMA_HEAD or revision in known_revisions()
    return SchemaState(revision=revision, min_reader=min_reader, known=known)


def _sqlite_engine(url: str, *, database: str | None) -> Engine:
    in_memory = database in (None, "", ":memory:")
    if not in_memory:
        try:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryDatabaseError(f"cannot create the folder of {database}: {e}") from e
    options: dict[str, Any] = {
        "connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
    }
    if in_memory:
        options["poolclass"] = StaticPool  # one shared connection, or the data vanishes
    engine = create_engine(url, **options)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module, so "begin" below decides the mode.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid URL>"
