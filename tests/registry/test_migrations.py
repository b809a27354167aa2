"""Schema migrations run in code on open: a fresh database is created at the newest revision,
an existing one is kept (and upgraded with its data), a newer one that does not declare this
code a reader is refused, and the migrations match the table classes. The expand/contract
rules themselves: tests/registry/test_schema_compat.py."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from registry.db import (
    MIGRATIONS_DIR,
    SCHEMA_HEAD,
    create_registry_engine,
    current_revision,
    open_engine,
    upgrade_schema,
)
from registry.errors import RegistryDatabaseError
from registry.experiment_records import VariantSpec
from registry.service import Registry
from registry.settings import RegistrySettings
from registry.store import RegistryStore

TABLES = {
    "adapters",
    "adapter_versions",
    "aliases",
    "alias_events",
    "registry_state",
    "experiments",
    "experiment_events",
    "experiment_users",
    "experiment_counters",
    "experiment_completions",
    "experiment_replicas",
    "version_evaluations",
}
# Tables with no table class: registry.db reads them in SQL.
SCHEMA_ONLY_TABLES = {"loraplex_schema_compat"}


def test_schema_head_is_the_newest_migration():
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_HEAD


def test_a_fresh_database_is_created_at_the_newest_revision(database_url):
    engine = open_engine(database_url)
    try:
        assert TABLES | SCHEMA_ONLY_TABLES <= set(inspect(engine).get_table_names())
        assert current_revision(engine) == SCHEMA_HEAD
        assert RegistryStore(engine).revision() == 0
    finally:
        engine.dispose()


def test_the_migrations_match_the_table_classes(database_url):
    engine = open_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            differences = [
                d
                for d in compare_metadata(context, SQLModel.metadata)
                if not (d[0] == "remove_table" and d[1].name not in TABLES)
            ]
        assert differences == []
    finally:
        engine.dispose()


def test_reopening_keeps_the_data(settings, make_adapter):
    with Registry.open(settings) as registry:
        registry.register("kept", make_adapter(), actor="ana")
    with Registry.open(settings) as registry:
        assert registry.store.get_adapter("kept").versions == (1,)


def test_a_database_from_a_newer_release_that_excludes_this_one_is_refused(database_url):
    open_engine(database_url).dispose()
    engine = open_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        conn.execute(text("UPDATE loraplex_schema_compat SET min_reader = '9999'"))
    engine.dispose()
    message = f"at schema 9999, which needs loraplex code at schema 9999 .* up to {SCHEMA_HEAD}"
    with pytest.raises(RegistryDatabaseError, match=message):
        open_engine(database_url)


def _fill_the_first_schema(database_url: str) -> None:
    """A database at revision 0001 with a name, two versions and two alias moves, written in
    SQL (the table classes already describe the newer schema)."""
    engine = create_registry_engine(database_url)
    try:
        upgrade_schema(engine, revision="0001")
        version = (
            "INSERT INTO adapter_versions (id, adapter_id, number, sha256, size_bytes, base_model,"
            " rank, alpha, target_modules, tags, lineage, created_at, created_by) VALUES"
            " (:id, 1, :id, :sha, 10, 'base', 8, 16.0, '[\"q_proj\"]', '{}', '{}', :at, 'ana')"
        )
        event = (
            "INSERT INTO alias_events (adapter_id, alias, kind, from_version, to_version, actor,"
            " reason, at) VALUES (1, 'production', 'promote', :old, :new, 'ana', :why, :at)"
        )
        at = "2026-11-30 10:00:00+00:00"
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO adapters (id, name, base_model, created_at, created_by)"
                    " VALUES (1, 'old', 'base', :at, 'ana')"
                ),
                {"at": at},
            )
            for number in (1, 2):
                conn.execute(text(version), {"id": number, "sha": str(number) * 64, "at": at})
            conn.execute(
                text(
                    "INSERT INTO aliases (adapter_id, alias, version, updated_at)"
                    " VALUES (1, 'production', 2, :at)"
                ),
                {"at": at},
            )
            conn.execute(text(event), {"old": None, "new": 1, "why": "first", "at": at})
            conn.execute(text(event), {"old": 1, "new": 2, "why": "second", "at": at})
            conn.execute(text("UPDATE registry_state SET revision = 5"))
        assert current_revision(engine) == "0001"
    finally:
        engine.dispose()


def test_upgrading_from_the_first_schema_keeps_the_data(database_url):
    _fill_the_first_schema(database_url)
    store = RegistryStore.open(database_url)
    try:
        assert current_revision(store.engine) == SCHEMA_HEAD
        assert store.revision() == 5
        assert store.resolve("old").number == 2
        moves = store.history("old")
        assert [(m.from_version, m.to_version, m.reason) for m in moves] == [
            (None, 1, "first"),
            (1, 2, "second"),
        ]
        assert [m.details for m in moves] == [None, None]
        started = store.experiments.start(
            "old",
            variants=[VariantSpec(2, 1.0), VariantSpec(1, 1.0)],
            ramp=None,
            config={},
            actor="bo",
        )
        _, move = store.experiments.end(
            started.id, status="rolled_back", actor="bo", reason="r", details={}, to_version=1
        )
        assert store.history("old")[-1].details["experiment"] == started.id
        assert store.rollback("old", actor="bo").to_version == 2
    finally:
        store.close()


def test_upgrading_from_the_experiments_schema_adds_evaluations(database_url):
    _fill_the_first_schema(database_url)
    engine = create_registry_engine(database_url)
    try:
        upgrade_schema(engine, revision="0002")
        assert current_revision(engine) == "0002"
        assert "version_evaluations" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    store = RegistryStore.open(database_url)
    try:
        assert current_revision(store.engine) == SCHEMA_HEAD
        assert store.revision() == 5 and store.resolve("old").number == 2
        added = store.evaluations.add(
            "old", 2, baseline="old@1", dataset_sha256="0" * 64, metrics={"m": 1}, actor="ana"
        )
        assert store.evaluations.latest("old", 2) == added
        assert store.revision() == 5
    finally:
        store.close()


def test_the_default_database_lives_in_the_data_dir(tmp_path):
    settings = RegistrySettings(home=tmp_path / "home")
    assert settings.database_url() == f"sqlite:///{tmp_path / 'home' / 'registry.db'}"
    assert settings.artifacts_url() == (tmp_path / "home" / "artifacts").as_uri()
    with Registry.open(settings) as registry:
        assert registry.store.list_adapters() == []
    assert (tmp_path / "home" / "registry.db").is_file()


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    monkeypatch.setenv("LORAPLEX_REGISTRY", "sqlite:///x.db")
    monkeypatch.setenv("LORAPLEX_ARTIFACTS", "s3://b/p")
    monkeypatch.setenv("LORAPLEX_MAX_LORA_RANK", "64")
    settings = RegistrySettings()
    assert (settings.home, settings.database_url(), settings.artifacts_url()) == (
        tmp_path,
        "sqlite:///x.db",
        "s3://b/p",
    )
    assert settings.max_lora_rank == 64 and settings.base_model == "smollm2"


@pytest.mark.parametrize(
    ("url", "message"),
    [("mysql://u@h/db", "unsupported registry database 'mysql'"), ("not a url", "invalid")],
)
def test_unsupported_databases_are_named(url, message):
    with pytest.raises(RegistryDatabaseError, match=message):
        open_engine(url)
