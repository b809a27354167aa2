"""Shared fixtures: the embedded model and the test adapters, prepared once and cached on disk.

The cache root is LORAPLEX_TEST_CACHE (default ~/.cache/loraplex-test) so that the model
conversion and the adapter training run once per machine, not once per test run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.embedded_model import prepare_embedded_model
from tests.support.adapters import build_test_adapters


def test_cache_root() -> Path:
    """Where session fixtures keep what is expensive to rebuild."""
    return Path(os.environ.get("LORAPLEX_TEST_CACHE", Path.home() / ".cache" / "loraplex-test"))


test_cache_root.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory):
    """Every test (and every process it starts) gets an empty LORAPLEX_HOME unless it says
    otherwise: what a user has in ~/.loraplex (a prepared model, a registry) changes no result."""
    previous = os.environ.get("LORAPLEX_HOME")
    home = tmp_path_factory.mktemp("loraplex-home")
    os.environ["LORAPLEX_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("LORAPLEX_HOME", None)
    else:
        os.environ["LORAPLEX_HOME"] = previous


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (downloaded and converted on first use)."""
    return prepare_embedded_model(test_cache_root())


@pytest.fixture(scope="session")
def test_adapters(embedded_model_dir: Path) -> dict[str, Path]:
    """Adapter name -> PEFT LoRA folder, for the adapters in tests.support.adapters."""
    return build_test_adapters(embedded_model_dir, test_cache_root() / "adapters")


from tests.support.fixtures import (  # noqa: E402, F401 - fixtures shared by the suite
    async_client,
    client,
    fake_server,
    real_server,
)
from tests.support.stores import (  # noqa: E402, F401 - one PostgreSQL and one S3 per session
    database_url,
    postgres_server,
    postgres_url,
    s3_endpoint,
    s3_url,
)
