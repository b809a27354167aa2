"""The FastAPI application factory. Everything the app uses is passed in (engine, resolver,
metrics registry, keys), so tests can build apps around the real engine or the fake one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from loraplex import __version__
from registry.service import Registry
from server.admin import router as admin_router
from server.api import router
from server.engine import Engine
from server.http_errors import install_error_handlers
from server.metrics import ServerMetrics
from server.openai_service import CompletionService
from server.request_limits import DEFAULT_MAX_REQUEST_BYTES, RequestLimits
from server.state import AppState
from server.targets import ModelResolver

log = logging.getLogger(__name__)


def create_app(
    *,
    engine: Engine,
    resolver: ModelResolver,
    metrics: ServerMetrics | None = None,
    api_keys: list[str] | None = None,
    manage_engine: bool = True,
    on_ready: Callable[[], None] | None = None,
    on_startup_error: Callable[[str], None] | None = None,
    registry: Registry | None = None,
    admin_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """Build the app. With `manage_engine`, startup starts the engine and preloads adapters and
    shutdown stops it; without, the caller owns the engine's lifetime (a shared test engine)."""
    metrics = metrics or ServerMetrics(CollectorRegistry())
    state = AppState(
        engine=engine,
        resolver=resolver,
        service=CompletionService(engine, resolver, metrics),
        metrics=metrics,
        api_keys=list(api_keys or []),
        started_at=int(time.time()),
    )

    async def start() -> None:
        try:
            if manage_engine:
                await engine.start()
            await resolver.preload()
        except Exception as e:  # /ready reports the reason; the caller decides whether to exit
            state.startup_error = f"{type(e).__name__}: {e}"
            log.exception("startup failed")
            if on_startup_error is not None:
                on_startup_error(state.startup_error)
            return
        state.startup_done = True
        metrics.engine_ready.set(1)
        if on_ready is not None:
            on_ready()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # The engine starts in the background so that /health answers at once and /ready says
        # "starting" until the engine and adapters are loaded.
        task = asyncio.create_task(start())
        try:
            yield
        finally:
            task.cancel()
            await resolver.close()
            if manage_engine:
                await engine.shutdown()

    app = FastAPI(title="loraplex", version=__version__, lifespan=lifespan)
    app.state.loraplex = state
    app.state.loraplex_registry = registry
    app.state.loraplex_admin_key = admin_key
    install_error_handlers(app)
    app.add_middleware(RequestLimits, max_body_bytes=max_request_bytes)
    app.include_router(router)
    app.include_router(admin_router)
    return app
