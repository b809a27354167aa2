"""Schema migrations run in code on open: a fresh database is created at the newest revision,
an existing one is kept, a newer one is refused, and the migrations match the table classes."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from registry.db import MIGRATIONS_DIR, SCHEMA_HEAD, current_revision, open_engine
from registry.errors import RegistryDatabaseError
from registry.service import Registry
from registry.settings import RegistrySettings
from registry.store import RegistryStore

TABLES = {"adapters", "adapter_versions", "aliases", "alias_events", "registry_state"}


def test_schema_head_is_the_newest_migration():
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_HEAD


def test_a_fresh_database_is_created_at_the_newest_revision(database_url):
    engine = open_engine(database_url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
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


def test_a_database_from_a_newer_release_is_refused(database_url):
    open_engine(database_url).dispose()
    engine = open_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(RegistryDatabaseError, match="knows schema up to 0001"):
        open_engine(database_url)


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
