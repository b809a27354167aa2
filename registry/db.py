"""Opening the metadata database: the engine (SQLite or PostgreSQL) and its schema migrations.

`open_engine` brings any database to the newest schema with Alembic, run in code from the
scripts shipped in registry/migrations, so a fresh file is created and an old one upgraded.
SQLite write transactions start with BEGIN IMMEDIATE so concurrent writers queue, not collide.
`database_errors` is the one place where driver errors become the registry's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
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

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# The newest migration's revision; tests check it against the scripts. Lets `open_engine` skip
# importing Alembic when the schema is already current (most CLI calls, every server start).
SCHEMA_HEAD = "0003"
SQLITE_BUSY_TIMEOUT_S = 30.0
_MIGRATION_LOCK_KEY = 0x6C6F7261  # pg_advisory_xact_lock key: one migrator at a time
SUPPORTED_DATABASES = ("sqlite:///PATH", "postgresql+psycopg://USER:PASSWORD@HOST/DB")


def open_engine(url: str) -> Engine:
    """An engine for `url` whose schema is at SCHEMA_HEAD (created or upgraded as needed)."""
    engine = create_registry_engine(url)
    try:
        if current_revision(engine) != SCHEMA_HEAD:
            upgrade_schema(engine)
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


def upgrade_schema(engine: Engine, *, revision: str = "head") -> None:
    """Run the shipped migrations up to `revision` in one transaction, one migrator at a time."""
    from alembic import command
    from alembic.config import Config
    from alembic.util import CommandError

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with write_engine(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        config.attributes["connection"] = conn
        try:
            command.upgrade(config, revision)
        except CommandError as e:
            raise RegistryDatabaseError(
                f"cannot migrate the registry database (this loraplex knows schema up to "
                f"{SCHEMA_HEAD}; a newer loraplex may have written it): {e}"
            ) from e


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
