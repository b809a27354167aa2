"""Alembic migration scripts of the registry schema, run in code by registry.db."""
