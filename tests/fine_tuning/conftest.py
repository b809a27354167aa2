"""The fine-tuning tests reuse the registry suite's throwaway PostgreSQL."""

from tests.registry.conftest import database_url, postgres_server, postgres_url  # noqa: F401
