"""Rolling deploys: the expand/contract schema policy (registry/migrations/__init__.py).

"New" code is simulated by a test-only migration after this code's head, in a versions folder
of the test's own: this code must start on that newer schema and work when the migration is an
expand step, refuse it (naming both revisions, changing nothing) when it is a contract step,
upgrade an older schema, and `loraplex registry migrate` run twice at once must do the work once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from inspect import getsource as inspect_source
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text
from typer.testing import CliRunner

from loraplex.cli import app
from registry.db import (
    MIGRATIONS_DIR,
    SCHEMA_HEAD,
    create_registry_engine,
    current_revision,
    open_engine,
    schema_state,
    upgrade_schema,
    write_engine,
)
from registry.errors import RegistryDatabaseError
from registry.service import Registry
from registry.settings import RegistrySettings
from tests.support.registry_stack import RegistryStack
from tests.support.servers import wait_for

LORAPLEX = str(Path(sys.executable).with_name("loraplex"))
FUTURE = "9001"

FUTURE_MIGRATION = '''"""A later release's migration (test only)."""
import sqlalchemy as sa
from alembic import op

from registry.migrations import require_readers_from

revision = "{revision}"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "future_notes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("note", sa.String(64), nullable=False),
    )
    op.execute("INSERT INTO future_notes (id, note) VALUES (1, 'written by the new release')")
    with op.batch_alter_table("adapter_versions") as batch:
        batch.add_column(sa.Column("future_score", sa.Float, nullable=True))
    {contract}


def downgrade():
    pass
'''


def apply_future_release(database_url: str, folder: Path, *, contract: bool) -> None:
    """Migrate the database as the next release would: this code's scripts, then FUTURE."""
    folder.mkdir(parents=True, exist_ok=True)
    step = f'require_readers_from("{FUTURE}")' if contract else "pass  # expand: readers unchanged"
    script = FUTURE_MIGRATION.format(revision=FUTURE, head=SCHEMA_HEAD, contract=step)
    (folder / f"{FUTURE}_future.py").write_text(script)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.set_main_option(
        "version_locations", os.pathsep.join([str(MIGRATIONS_DIR / "versions"), str(folder)])
    )
    engine = create_registry_engine(database_url)
    try:
        with write_engine(engine).begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, FUTURE)
        assert current_revision(engine) == FUTURE
    finally:
        engine.dispose()


CONTRACT_OPERATIONS = (
    "drop_table",
    "drop_column",
    "rename_table",
    "alter_column",
    "drop_constraint",
)


def test_every_migration_that_removes_or_changes_something_is_a_marked_contract_step():
    """The policy's guard: an upgrade() that drops, renames or alters must say which readers it
    excludes (`require_readers_from`); everything else is expand and leaves the row alone."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    from alembic.script import ScriptDirectory

    unmarked = []
    for script in ScriptDirectory.from_config(config).walk_revisions():
        upgrade = inspect_source(script.module.upgrade)
        found = [op for op in CONTRACT_OPERATIONS if f".{op}(" in upgrade]
        if found and "require_readers_from(" not in upgrade:
            unmarked.append(f"{script.revision}: {', '.join(found)}")
    assert unmarked == [], "contract steps must call require_readers_from (registry/migrations)"


def migrate_cli(database_url: str, *flags: str):
    result = CliRunner().invoke(app, ["registry", "migrate", "--registry", database_url, *flags])
    return result


@pytest.fixture
def registry_settings(tmp_path: Path, database_url: str) -> RegistrySettings:
    return RegistrySettings(
        home=tmp_path / "home", registry=database_url, artifacts=(tmp_path / "art").as_uri()
    )


def test_this_code_works_on_a_newer_expand_only_schema(
    registry_settings, database_url, tmp_path, make_adapter
):
    with Registry.open(registry_settings) as registry:
        registry.register("rolling", make_adapter(), actor="ana")
        registry.store.promote("rolling", 1, actor="ana")
    apply_future_release(database_url, tmp_path / "future", contract=False)

    with Registry.open(registry_settings) as registry:  # the old replica restarts
        registry.register("rolling", make_adapter(), actor="ana")
        assert registry.store.promote("rolling", 2, actor="bo").to_version == 2
        assert registry.store.resolve("rolling").number == 2
        assert registry.store.rollback("rolling", actor="bo").to_version == 1
        assert registry.store.resolve("rolling@2").number == 2
        assert current_revision(registry.store.engine) == FUTURE  # neither upgraded nor downgraded
        stack = RegistryStack(tmp_path / "server", registry).serve()  # a server starts on it
        try:
            assert stack.served("rolling") == "rolling@1"
            assert stack.served("rolling@2") == "rolling@2"
        finally:
            stack.stop()

    engine = create_registry_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT note FROM future_notes")).scalar() == (
                "written by the new release"
            )
            scores = conn.execute(text("SELECT future_score FROM adapter_versions")).all()
            assert [tuple(row) for row in scores] == [(None,), (None,)]
        state = schema_state(engine)
        assert (state.revision, state.min_reader, state.status) == (FUTURE, "0003", "newer")
    finally:
        engine.dispose()

    migrated = migrate_cli(database_url, "--json")
    assert migrated.exit_code == 0, migrated.output
    assert json.loads(migrated.stdout) | {"database": None} == {
        "from": FUTURE, "to": FUTURE, "head": SCHEMA_HEAD, "min_reader": "0003",
        "status": "newer", "changed": False, "database": None,
    }  # fmt: skip
    assert migrate_cli(database_url, "--check").exit_code == 0


def test_a_newer_contract_schema_is_refused_naming_both_revisions(
    registry_settings, database_url, tmp_path
):
    open_engine(database_url).dispose()
    apply_future_release(database_url, tmp_path / "future", contract=True)
    message = (
        f"at schema {FUTURE}, which needs loraplex code at schema {FUTURE} or newer; "
        f"this loraplex knows schema up to {SCHEMA_HEAD}"
    )
    with pytest.raises(RegistryDatabaseError, match=message):
        open_engine(database_url)
    with pytest.raises(RegistryDatabaseError, match=message):
        Registry.open(registry_settings)
    for flags in ((), ("--check",)):
        result = migrate_cli(database_url, *flags)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error: the registry database is at schema 9001")
        assert result.stderr.count("\n") == 1
    engine = create_registry_engine(database_url)
    try:
        assert (current_revision(engine), schema_state(engine).min_reader) == (FUTURE, FUTURE)
    finally:
        engine.dispose()


def test_an_unknown_revision_without_a_compatibility_row_is_refused(database_url):
    engine = create_registry_engine(database_url)
    try:
        upgrade_schema(engine, revision="0003")  # before the compatibility row existed
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'a1b2c3'"))
    finally:
        engine.dispose()
    message = "at schema a1b2c3, which does not say which releases can use it; this loraplex"
    with pytest.raises(RegistryDatabaseError, match=message):
        open_engine(database_url)
    assert migrate_cli(database_url, "--check").exit_code == 1


def test_an_older_schema_is_upgraded_and_migrate_is_idempotent(database_url):
    engine = create_registry_engine(database_url)
    try:
        upgrade_schema(engine, revision="0003")
        assert schema_state(engine).status == "behind"
    finally:
        engine.dispose()
    assert migrate_cli(database_url, "--check").exit_code == 1
    first = migrate_cli(database_url)
    assert (first.exit_code, first.stdout) == (0, f"registry schema 0003 -> {SCHEMA_HEAD}\n")
    again = migrate_cli(database_url)
    assert (again.exit_code, again.stdout) == (0, f"registry schema {SCHEMA_HEAD}: up to date\n")
    assert migrate_cli(database_url, "--check").exit_code == 0
    engine = open_engine(database_url)
    try:
        state = schema_state(engine)
        assert (state.revision, state.min_reader, state.status) == (SCHEMA_HEAD, "0003", "current")
    finally:
        engine.dispose()


def test_migrate_fails_with_one_line_on_an_unreachable_database():
    result = migrate_cli("postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: the registry database at postgresql+psycopg://")
    assert "unavailable" in result.stderr and result.stderr.count("\n") == 1


def _start_migrations(database_url: str, count: int) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [LORAPLEX, "registry", "migrate", "--registry", database_url, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]


def _results(processes: list[subprocess.Popen]) -> list[dict]:
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        results.append(json.loads(out))
    return results


def _assert_one_consistent_schema(database_url: str, results: list[dict]) -> None:
    assert sorted(r["changed"] for r in results) == [False, True]
    assert {(r["to"], r["status"]) for r in results} == {(SCHEMA_HEAD, "current")}
    engine = create_registry_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
            assert conn.execute(text("SELECT count(*) FROM loraplex_schema_compat")).scalar() == 1
            assert conn.execute(text("SELECT revision FROM registry_state")).all() == [(0,)]
        assert "adapters" in inspect(engine).get_table_names()
        assert current_revision(engine) == SCHEMA_HEAD
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_concurrent_migrations_on_postgres_run_once(postgres_url):
    """Both wait on the migration lock (held here), then one migrates and the other finds it done."""
    import psycopg

    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (0x6C6F7261,))
        processes = _start_migrations(postgres_url, 2)

        def both_waiting() -> bool:
            waiting = holder.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'"
            ).fetchone()[0]
            return waiting == 2

        wait_for(both_waiting, timeout=60)
        holder.execute("SELECT pg_advisory_unlock(%s)", (0x6C6F7261,))
    _assert_one_consistent_schema(postgres_url, _results(processes))


def test_concurrent_migrations_on_sqlite_queue_on_the_write_lock(tmp_path):
    """SQLite is one host's file: BEGIN IMMEDIATE makes the second migrator wait for the first."""
    path = tmp_path / "registry.db"
    url = f"sqlite:///{path}"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("BEGIN IMMEDIATE")
    processes = _start_migrations(url, 2)
    time.sleep(3)  # both started and blocked on the write lock (no pass/fail timing)
    assert [p.poll() for p in processes] == [None, None]
    holder.execute("COMMIT")
    holder.close()
    _assert_one_consistent_schema(url, _results(processes))
