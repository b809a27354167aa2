"""Running the real server: settings -> vLLM engine, local adapters, app, uvicorn."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry
from rich.console import Console

from server.settings import ServeSettings


class ServeError(Exception):
    """The server cannot start with these settings; the message says why."""


def run_server(settings: ServeSettings, *, model_dir: Path, console: Console) -> None:
    import uvicorn

    from server.app import create_app
    from server.engine_vllm import VllmEngine, VllmEngineSettings
    from server.metrics import ServerMetrics
    from server.targets import LocalAdapters, parse_adapter_option

    if not (model_dir / "config.json").is_file():
        raise ServeError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    try:
        adapters = dict(parse_adapter_option(a) for a in settings.adapters)
    except ValueError as e:
        raise ServeError(f"--adapter: {e}") from e
    engine = VllmEngine(
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
        )
    )
    metrics = ServerMetrics(CollectorRegistry())
    try:
        local = LocalAdapters(
            engine, base_name=settings.served_name, adapters=adapters, metrics=metrics
        )
        local.validate(max_rank=settings.max_lora_rank)
    except ValueError as e:
        raise ServeError(str(e)) from e
    url = f"http://{settings.host}:{settings.port}"

    status = console.status(f"Starting the engine on {model_dir} (20-40 s on 2 CPU cores)...")

    def on_ready() -> None:
        status.stop()
        names = ", ".join(local.model_names())
        console.print(f"[green]loraplex is serving[/green] {url}/v1  (models: {names})")
        console.print(
            f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{settings.served_name}", "messages": '
            '[{"role": "user", "content": "What is the capital of France?"}]}\''
        )

    failure: list[str] = []

    def on_startup_error(reason: str) -> None:
        status.stop()
        failure.append(reason)
        server.should_exit = True

    app = create_app(
        engine=engine, resolver=local, metrics=metrics, api_keys=settings.api_keys,
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
    if failure:
        raise ServeError(f"startup failed: {failure[0]}")
