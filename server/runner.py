"""Running the real server: settings -> vLLM engine, registry, adapters, app, uvicorn."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry
from rich.console import Console

from server.settings import ServeSettings


class ServeError(Exception):
    """The server cannot start with these settings; the message says why."""


def build_engine(settings: ServeSettings, *, model_dir: Path):
    """The vLLM engine these settings describe, not started; the dtype is chosen here, once."""
    from loraplex.hardware import choose_dtype
    from server.engine_vllm import VllmEngine, VllmEngineSettings, installed_backend

    dtype = choose_dtype(settings.dtype, cuda=installed_backend() == "cuda")
    return VllmEngine(
        VllmEngineSettings(
            model_path=str(model_dir),
            served_name=settings.served_name,
            max_model_len=settings.max_model_len,
            max_loras=settings.max_loras,
            max_lora_rank=settings.max_lora_rank,
            max_cpu_loras=settings.max_cpu_loras,
            max_num_seqs=settings.max_num_seqs,
            max_queued_requests=settings.max_queued_requests,
            kv_cache_gib=settings.kv_cache_gib,
            patch_lora_ops=settings.lora_ops == "loraplex",
            dtype=dtype.dtype,
            dtype_reason=dtype.reason,
        )
    )


def build_resolver(settings: ServeSettings, *, engine, metrics):
    """Local adapter folders plus the registry, validated before the engine starts."""
    from registry.errors import RegistryError
    from registry.service import Registry
    from server.adapter_cache import AdapterDiskCache
    from server.adapter_loader import AdapterLoader
    from server.registry_resolver import RegistryResolver
    from server.targets import LocalAdapters, parse_adapter_option

    try:
        adapters = dict(parse_adapter_option(a) for a in settings.adapters)
    except ValueError as e:
        raise ServeError(f"--adapter: {e}") from e
    try:
        local = LocalAdapters(
            engine, base_name=settings.served_name, adapters=adapters, metrics=metrics
        )
        local.validate(max_rank=settings.max_lora_rank)
    except ValueError as e:
        raise ServeError(str(e)) from e
    try:
        registry = Registry.open(settings)
    except RegistryError as e:
        raise ServeError(f"cannot open the registry: {e}") from e
    cache = AdapterDiskCache(
        settings.data_dir() / "cache" / "adapters",
        artifacts=registry.artifacts,
        max_bytes=int(settings.adapter_cache_gib * 1024**3),
        metrics=metrics,
    )
    loader = AdapterLoader(
        engine, cache, metrics=metrics, max_loaded=settings.max_cpu_loras,
        max_rank=settings.max_lora_rank, first_id=len(adapters) + 1,
    )  # fmt: skip
    resolver = RegistryResolver(
        registry.store, loader, local=local, metrics=metrics,
        poll_seconds=settings.registry_poll_seconds,
    )  # fmt: skip
    return resolver, registry


def run_server(settings: ServeSettings, *, model_dir: Path, console: Console) -> None:
    import uvicorn

    from server.app import create_app
    from server.metrics import ServerMetrics

    if not (model_dir / "config.json").is_file():
        raise ServeError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    engine = build_engine(settings, model_dir=model_dir)
    metrics = ServerMetrics(CollectorRegistry())
    resolver, registry = build_resolver(settings, engine=engine, metrics=metrics)
    url = f"http://{settings.host}:{settings.port}"
    status = console.status(f"Starting the engine on {model_dir} (20-40 s on 2 CPU cores)...")
    failure: list[str] = []

    def on_ready() -> None:
        status.stop()
        console.print(f"[green]loraplex is serving[/green] {url}/v1")
        console.print(f"  models: {', '.join(resolver.model_names())}")
        console.print(f"  dtype: {engine.info.dtype} ({engine.info.dtype_reason})")
        console.print(
            f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{settings.served_name}", "messages": '
            '[{"role": "user", "content": "What is the capital of France?"}]}\''
        )

    def on_startup_error(reason: str) -> None:
        status.stop()
        failure.append(reason)
        server.should_exit = True

    app = create_app(
        engine=engine, resolver=resolver, metrics=metrics, api_keys=settings.api_keys,
        registry=registry, admin_key=settings.admin_key, max_request_bytes=settings.max_request_bytes,
        on_ready=on_ready, on_startup_error=on_startup_error,
    )  # fmt: skip
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    status.start()
    try:
        server.run()
    finally:
        status.stop()
        registry.close()
    if failure:
        raise ServeError(f"startup failed: {failure[0]}")
