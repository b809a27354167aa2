"""Running the real server: settings -> vLLM engine, registry, adapters, app, uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import uvicorn
from prometheus_client import CollectorRegistry
from rich.console import Console

from server.settings import ServeSettings, engine_max_loras


class ServeError(Exception):
    """The server cannot start with these settings; the message says why."""

    exit_code = 2


class EngineStoppedError(ServeError):
    """The engine died while serving; the process exits 1 so that a supervisor restarts it."""

    exit_code = 1


def build_engine(settings: ServeSettings, *, model_dir: Path):
    """The vLLM engine these settings describe, not started; the dtype is chosen here, once."""
    from loraplex.hardware import choose_dtype
    from server.engine_vllm import VllmEngine, VllmEngineSettings, installed_backend

    backend = installed_backend()
    dtype = choose_dtype(settings.dtype, cuda=backend == "cuda")
    return VllmEngine(
        VllmEngineSettings(
            model_path=str(model_dir),
            served_name=settings.served_name,
            max_model_len=settings.max_model_len,
            max_loras=engine_max_loras(settings, backend),
            max_lora_rank=settings.max_lora_rank,
            max_cpu_loras=settings.max_cpu_loras,
            max_num_seqs=settings.max_num_seqs,
            max_queued_requests=settings.max_queued_requests,
            kv_cache_gib=settings.kv_cache_gib,
            tensor_parallel_size=settings.tensor_parallel_size,
            gpu_memory_utilization=settings.gpu_memory_utilization,
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
    if len(adapters) > settings.max_cpu_loras:
        raise ServeError(
            f"{len(adapters)} --adapter folders but the engine holds {settings.max_cpu_loras} "
            "adapters (LORAPLEX_MAX_CPU_LORAS): raise it or serve fewer"
        )
    if settings.model is not None:  # adapters are checked against the model actually served
        settings = settings.model_copy(update={"base_model_dir": settings.model})
    try:
        registry = Registry.open(settings)
    except RegistryError as e:
        raise ServeError(f"cannot open the registry: {e}") from e
    try:
        local = LocalAdapters(
            engine, base_name=settings.served_name, adapters=adapters, metrics=metrics
        )
        local.validate(max_rank=settings.max_lora_rank, base=registry.base)
    except ValueError as e:
        registry.close()
        raise ServeError(str(e)) from e
    cache = AdapterDiskCache(
        settings.data_dir() / "cache" / "adapters",
        artifacts=registry.artifacts,
        max_bytes=int(settings.adapter_cache_gib * 1024**3),
        metrics=metrics,
    )
    loader = AdapterLoader(
        engine, cache, metrics=metrics, max_loaded=settings.max_cpu_loras,
        max_rank=settings.max_lora_rank, first_id=len(adapters) + 1, base=registry.base,
    )  # fmt: skip
    resolver = RegistryResolver(
        registry.store, loader, local=local, metrics=metrics,
        poll_seconds=settings.registry_poll_seconds, max_loras=engine.info.max_loras,
        analysis_seconds=settings.ab_analysis_seconds,
        feedback_ttl_seconds=settings.feedback_ttl_seconds,
    )  # fmt: skip
    return resolver, registry


def run_server(settings: ServeSettings, *, model_dir: Path, console: Console) -> None:
    """Serve until SIGINT/SIGTERM (a clean return) or until the engine dies (`EngineStoppedError`).

    On a stop signal, new connections are refused, in-flight requests get `drain_seconds` to
    finish, then the engine shuts down. A dead engine never recovers in this process, so the
    server exits non-zero and its supervisor restarts it, as vLLM's own server does."""
    from server.app import create_app
    from server.metrics import ServerMetrics

    if not (model_dir / "config.json").is_file():
        raise ServeError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    sock = _listen(settings.host, settings.port)  # before the engine: a busy port fails at once
    engine = build_engine(settings, model_dir=model_dir)
    metrics = ServerMetrics(CollectorRegistry())
    resolver, registry = build_resolver(settings, engine=engine, metrics=metrics)
    status = console.status(f"Starting the engine on {model_dir} (20-40 s on 2 CPU cores)...")
    errors: list[ServeError] = []

    def stop(error: ServeError) -> None:
        status.stop()
        errors.append(error)
        server.should_exit = True

    def on_ready() -> None:
        status.stop()
        _print_ready(console, settings, engine=engine, models=resolver.model_names())

    app = create_app(
        engine=engine, resolver=resolver, metrics=metrics, api_keys=settings.api_keys,
        registry=registry, admin_key=settings.admin_key, max_request_bytes=settings.max_request_bytes,
        fine_tuning=settings, on_ready=on_ready,
        on_startup_error=lambda reason: stop(ServeError(f"startup failed: {reason}")),
        on_engine_dead=lambda reason: stop(
            EngineStoppedError(f"{reason} Exiting, so that a supervisor can restart loraplex.")
        ),
    )  # fmt: skip
    lifecycle = app.state.loraplex_lifecycle
    server = QuietSignalServer(
        _uvicorn_config(app, settings),
        on_stop_signal=lambda: lifecycle.drain(settings.drain_seconds),
    )
    status.start()
    try:
        server.run(sockets=[sock])
    finally:
        status.stop()
        sock.close()
        registry.close()
    if errors:
        raise errors[0]


def _print_ready(console: Console, settings: ServeSettings, *, engine, models: list[str]) -> None:
    url = f"http://{settings.host}:{settings.port}"
    console.print(f"[green]loraplex is serving[/green] {url}/v1")
    console.print(f"  models: {', '.join(models)}")
    console.print(f"  dtype: {engine.info.dtype} ({engine.info.dtype_reason})")
    console.print(
        f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{settings.served_name}", "messages": '
        '[{"role": "user", "content": "What is the capital of France?"}]}\''
    )


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


def _uvicorn_config(app, settings: ServeSettings) -> uvicorn.Config:
    return uvicorn.Config(
        app, log_level=settings.log_level if settings.log_level == "debug" else "warning",
        access_log=settings.log_level == "debug",
        # A backstop: the drain (server.lifecycle) ends requests in flight in time, each with an
        # error of its own; uvicorn's cancellation would log a traceback per request instead.
        timeout_graceful_shutdown=settings.drain_seconds + 5,
    )  # fmt: skip


class QuietSignalServer(uvicorn.Server):
    """uvicorn re-raises the stop signal once it has shut down, so Ctrl-C ends in a
    KeyboardInterrupt (exit 130) and SIGTERM kills the process before our cleanup runs; here a
    stop that was asked for ends `run()` normally, and the first one starts the drain."""

    def __init__(self, config: uvicorn.Config, *, on_stop_signal: Callable[[], None]):
        super().__init__(config)
        self._on_stop_signal = on_stop_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            with contextlib.suppress(RuntimeError):  # no event loop yet: nothing in flight
                asyncio.get_running_loop().call_soon(self._on_stop_signal)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
