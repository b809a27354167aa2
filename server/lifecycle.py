"""A server's life, apart from HTTP: start the engine and preload adapters (and read the registry
once) in the background, watch the engine while serving, stop everything on shutdown.

A dead engine (vLLM's core process exited) never comes back in this process, so it is reported
once: `AppState.engine_dead` makes `/health` fail, and `on_engine_dead` lets `loraplex serve`
exit non-zero so that its supervisor (Kubernetes, systemd) restarts it, as vLLM's own server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from server.errors import EngineDeadError, EngineNotReadyError
from server.state import AppState

log = logging.getLogger(__name__)


@dataclass
class Lifecycle:
    state: AppState
    manage_engine: bool = True  # False: the caller starts and stops the engine (a shared one)
    on_ready: Callable[[], None] | None = None
    on_startup_error: Callable[[str], None] | None = None
    on_engine_dead: Callable[[str], None] | None = None
    health_poll_seconds: float = 0.5
    _task: asyncio.Task | None = None
    _drain: asyncio.TimerHandle | None = None
    _aborting: asyncio.Task | None = None

    def begin(self) -> None:
        """Start up in the background, so that /health answers at once and /ready says
        "starting" until the engine and adapters are loaded; then watch the engine."""
        self._task = asyncio.create_task(self._run(), name="loraplex-lifecycle")

    def drain(self, seconds: float) -> None:
        """A stop was asked for (the listening socket is closed by now): requests in flight get
        `seconds` to finish; then each ends with a 503 "shutting down" error, in-band for a
        stream, instead of being cut off mid-response. Call on the event loop's thread."""
        if self._drain is None:
            loop = asyncio.get_running_loop()
            self._drain = loop.call_later(seconds, self._abort_in_flight)

    def _abort_in_flight(self) -> None:
        reason = "The server is shutting down; retry the request."
        self._aborting = asyncio.create_task(self.state.engine.abort_all(reason))

    async def stop(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.state.resolver.close()
        if self.manage_engine:
            await self.state.engine.shutdown()

    async def _run(self) -> None:
        if await self._start():
            await self._watch()

    async def _start(self) -> bool:
        state = self.state
        try:
            if self.manage_engine:
                await state.engine.start()
            await state.resolver.preload()
        except Exception as e:  # /ready reports the reason; the caller decides whether to exit
            state.startup_error = f"{type(e).__name__}: {e}"
            log.exception("startup failed")
            if self.on_startup_error is not None:
                self.on_startup_error(state.startup_error)
            return False
        state.startup_done = True
        state.metrics.engine_ready.set(1)
        if self.on_ready is not None:
            self.on_ready()
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.health_poll_seconds)
            try:
                await self.state.engine.check_health()
            except EngineDeadError as e:
                self._died(e.message)
                return
            except EngineNotReadyError:
                continue  # stopping, or a transient state: only death is final

    def _died(self, reason: str) -> None:
        self.state.engine_dead = reason
        self.state.metrics.engine_ready.set(0)
        if self.on_engine_dead is not None:
            self.on_engine_dead(reason)  # the owner reports it (`loraplex serve`: one line)
        else:
            log.error("engine dead: %s", reason)
