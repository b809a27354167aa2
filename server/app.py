"""The FastAPI application factory. Everything the app uses is passed in (engine, resolver,
metrics registry, keys), so tests can build apps around the real engine or the fake one. Its
lifespan runs `server.lifecycle` (background startup, engine watch, shutdown).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from loraplex import __version__
from registry.service import Registry
from server.ab.http import router as ab_router
from server.admin import router as admin_router
from server.api import router
from server.engine import Engine
from server.fine_tuning.http import router as fine_tuning_router
from server.fine_tuning.settings import FineTuningSettings
from server.fine_tuning.worker import STOP_GRACE_S, in_process_worker
from server.http_errors import install_error_handlers
from server.lifecycle import Lifecycle
from server.metrics import ServerMetrics
from server.openai_service import CompletionService
from server.request_limits import DEFAULT_MAX_REQUEST_BYTES, UPLOAD_OVERHEAD_BYTES, RequestLimits
from server.state import AppState
from server.targets import ModelResolver


def create_app(
    *,
    engine: Engine,
    resolver: ModelResolver,
    metrics: ServerMetrics | None = None,
    api_keys: list[str] | None = None,
    manage_engine: bool = True,
    on_ready: Callable[[], None] | None = None,
    on_startup_error: Callable[[str], None] | None = None,
    on_engine_dead: Callable[[str], None] | None = None,
    registry: Registry | None = None,
    admin_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    fine_tuning: FineTuningSettings | None = None,
) -> FastAPI:
    """Build the app. With `manage_engine`, startup starts the engine and preloads adapters and
    shutdown stops it; without, the caller owns the engine's lifetime (a shared test engine).
    `on_engine_dead(reason)` is called once if the engine dies while serving. `fine_tuning`
    (default: from the environment) sets the fine-tuning API and its in-process worker."""
    fine_tuning = fine_tuning or FineTuningSettings()
    metrics = metrics or ServerMetrics(CollectorRegistry())
    state = AppState(
        engine=engine,
        resolver=resolver,
        service=CompletionService(engine, resolver, metrics),
        metrics=metrics,
        api_keys=list(api_keys or []),
        started_at=int(time.time()),
    )

    lifecycle = Lifecycle(
        state, manage_engine=manage_engine, on_ready=on_ready,
        on_startup_error=on_startup_error, on_engine_dead=on_engine_dead,
    )  # fmt: skip

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        lifecycle.begin()
        worker = in_process_worker(registry, fine_tuning)
        if worker is not None:
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                worker.stop(timeout=STOP_GRACE_S + 5)
            await lifecycle.stop()

    app = FastAPI(title="loraplex", version=__version__, lifespan=lifespan)
    app.state.loraplex = state
    app.state.loraplex_lifecycle = lifecycle  # the runner starts its drain on a stop signal
    app.state.loraplex_registry = registry
    app.state.loraplex_admin_key = admin_key
    app.state.loraplex_fine_tuning = fine_tuning
    install_error_handlers(app)
    upload = fine_tuning.fine_tuning_max_file_bytes + UPLOAD_OVERHEAD_BYTES  # checked exactly later
    app.add_middleware(
        RequestLimits, max_body_bytes=max_request_bytes, upload_bytes={"/v1/files": upload}
    )
    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(ab_router)
    app.include_router(fine_tuning_router)
    return app
