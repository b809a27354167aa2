"""One settings root: the server's settings are the registry's plus its own, read once."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.service import Registry
from registry.settings import RegistrySettings
from server.settings import ServeSettings


def test_serve_settings_are_registry_settings(tmp_path: Path) -> None:
    settings = ServeSettings(home=tmp_path, max_lora_rank=32)
    assert isinstance(settings, RegistrySettings)
    assert settings.database_url() == f"sqlite:///{tmp_path / 'registry.db'}"
    assert settings.max_lora_rank == 32


def test_registry_opened_by_the_server_uses_the_server_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The environment says one database, the flag another: the flag wins for the server and for
    # the registry it opens (no second read of the environment with its own defaults).
    monkeypatch.setenv("LORAPLEX_REGISTRY", f"sqlite:///{tmp_path / 'from-env.db'}")
    settings = ServeSettings(home=tmp_path, registry=f"sqlite:///{tmp_path / 'from-flag.db'}")
    registry = Registry.open(settings)
    try:
        assert (tmp_path / "from-flag.db").exists()
        assert not (tmp_path / "from-env.db").exists()
    finally:
        registry.close()


def test_more_local_adapters_than_engine_slots_is_refused_at_startup(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from server.engine_fake import FakeEngine
    from server.metrics import ServerMetrics
    from server.runner import ServeError, build_resolver

    settings = ServeSettings(
        home=tmp_path, max_cpu_loras=2, adapters=[f"a{i}={tmp_path / str(i)}" for i in range(3)]
    )
    metrics = ServerMetrics(CollectorRegistry())
    with pytest.raises(ServeError, match="3 --adapter folders but the engine holds 2"):
        build_resolver(settings, engine=FakeEngine(), metrics=metrics)


def test_parallelism_settings_reach_the_engine_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Kubernetes GPU overlay sets these through the environment; they must reach vLLM's
    # engine arguments, not stop at the settings object.
    from server.runner import build_engine

    monkeypatch.setenv("LORAPLEX_TENSOR_PARALLEL_SIZE", "2")
    monkeypatch.setenv("LORAPLEX_GPU_MEMORY_UTILIZATION", "0.85")
    engine = build_engine(ServeSettings(home=tmp_path), model_dir=tmp_path)
    from vllm.v1.engine.async_llm import AsyncLLM

    monkeypatch.setattr(AsyncLLM, "from_engine_args", staticmethod(lambda args: args))
    args = engine._build()  # the AsyncEngineArgs the engine would start with
    assert args.tensor_parallel_size == 2
    assert args.gpu_memory_utilization == 0.85
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        ServeSettings(home=tmp_path, gpu_memory_utilization=1.5)


def test_engine_slots_default_to_one_per_sequence_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --max-loras the CPU engine gets a slot for every sequence it decodes at once (no
    request waits for a slot), a GPU engine 4; --max-loras or LORAPLEX_MAX_LORAS wins."""
    from server import runner
    from server.settings import GPU_DEFAULT_MAX_LORAS, engine_max_loras

    default = ServeSettings(home=tmp_path, max_num_seqs=24)
    assert default.max_loras is None
    assert engine_max_loras(default, "cpu") == 24
    assert engine_max_loras(default, "cuda") == GPU_DEFAULT_MAX_LORAS == 4
    assert engine_max_loras(ServeSettings(home=tmp_path, max_loras=3), "cpu") == 3
    monkeypatch.setenv("LORAPLEX_MAX_LORAS", "5")
    assert engine_max_loras(ServeSettings(home=tmp_path), "cuda") == 5
    monkeypatch.delenv("LORAPLEX_MAX_LORAS")
    # What the engine is built with, and what the A/B router checks experiments against.
    monkeypatch.setattr("server.engine_vllm.installed_backend", lambda: "cpu")
    engine = runner.build_engine(default, model_dir=tmp_path)
    assert engine.info.max_loras == 24
    from vllm.v1.engine.async_llm import AsyncLLM

    monkeypatch.setattr(AsyncLLM, "from_engine_args", staticmethod(lambda args: args))
    assert engine._build().max_loras == 24
