"""Fixtures of the registry tests: real SQLite and PostgreSQL, a real S3 API over HTTP (moto's
server), and small synthetic PEFT adapter folders.

PostgreSQL comes from LORAPLEX_TEST_POSTGRES_URL (a role that may CREATE DATABASE) or, where the
server binaries exist, a throwaway cluster started for the session. Without either, postgres
tests skip locally and fail under CI=true, so CI never passes without having run them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from registry.service import Registry
from registry.settings import RegistrySettings
from tests.support.stores import _Cluster, _require_postgres_binaries

LAYER = "base_model.model.model.layers.0.self_attn"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


# --- PostgreSQL clusters of a module's own (the shared stores: tests/support/stores.py) ----


@pytest.fixture(scope="module")
def stoppable_postgres() -> Iterator[_Cluster]:
    """A cluster of this module's own that tests may stop (`.stop(mode="fast")`, `.resume()`).
    Always local binaries: an outside server (LORAPLEX_TEST_POSTGRES_URL) cannot be stopped."""
    cluster = _Cluster(_require_postgres_binaries())
    try:
        cluster.start()
        yield cluster
    finally:
        if cluster.started:
            cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture
def outage_postgres(stoppable_postgres: _Cluster) -> Iterator[_Cluster]:
    """The stoppable cluster, running at the start of each test and again after it."""
    if not stoppable_postgres.started:
        stoppable_postgres.resume()
    yield stoppable_postgres
    if not stoppable_postgres.started:
        stoppable_postgres.resume()


# --- adapters and registries -----------------------------------------------------------------


def write_adapter(
    folder: Path,
    *,
    rank: int = 8,
    base_model: str | None = BASE_MODEL,
    seed: int = 0,
    config: dict | None = None,
) -> Path:
    """A small PEFT LoRA folder (q_proj, v_proj); `seed` changes the weights, so the sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
    }
    if base_model is not None:
        cfg["base_model_name_or_path"] = base_model
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg, sort_keys=True))
    rng = np.random.default_rng(seed)
    tensors = {}
    for module in ("q_proj", "v_proj"):
        tensors[f"{LAYER}.{module}.lora_A.weight"] = rng.standard_normal((rank, 64), np.float32)
        tensors[f"{LAYER}.{module}.lora_B.weight"] = np.zeros((64, rank), np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture
def make_adapter(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1_000_000))

    def make(name: str | None = None, **kwargs: object) -> Path:
        index = next(counter)
        kwargs.setdefault("seed", index)
        return write_adapter(tmp_path / "adapters" / (name or f"a{index}"), **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def settings(tmp_path: Path, database_url: str, artifacts_root: Path) -> RegistrySettings:
    return RegistrySettings(
        home=tmp_path / "home", registry=database_url, artifacts=artifacts_root.as_uri()
    )


@pytest.fixture
def registry(settings: RegistrySettings) -> Iterator[Registry]:
    with Registry.open(settings) as opened:
        yield opened


@pytest.fixture
def artifacts_root(tmp_path: Path) -> Path:
    """The folder behind the `settings` fixture's file:// artifact store."""
    return tmp_path / "artifacts"


@pytest.fixture
def list_archives() -> Callable[[Path], list[Path]]:
    """Archives in a file:// store, temporary upload files excluded."""
    return lambda root: sorted(p for p in root.rglob("*.tar") if not p.name.startswith("."))


@pytest.fixture
def stacks() -> Iterator[list]:
    """Fake-engine servers on a real registry (`tests.support.registry_stack`), stopped after."""
    started: list = []
    yield started
    for stack in started:
        stack.stop()
