"""What one running server holds: engine, resolver, service, metrics, and where it stands in its
life (starting, serving, failed to start, engine dead). Built by `server.app`; the routes ask it
whether to admit a request, whether the process is alive and whether it is ready.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine import Engine
from server.errors import EngineDeadError, EngineNotReadyError
from server.metrics import ServerMetrics
from server.openai_service import CompletionService
from server.targets import ModelResolver

STARTING = "starting: the engine and adapters are loading"


@dataclass
class AppState:
    engine: Engine
    resolver: ModelResolver
    service: CompletionService
    metrics: ServerMetrics
    api_keys: list[str] = field(default_factory=list)
    started_at: int = 0
    startup_done: bool = False
    startup_error: str | None = None
    engine_dead: str | None = None  # why the engine died; set once, never cleared

    async def dead_reason(self) -> str | None:
        """Why this process can never serve again, or None while it is alive."""
        if self.engine_dead is None and self.engine.dead:
            try:
                await self.engine.check_health()
            except EngineDeadError as e:  # the engine says why
                self.engine_dead = e.message
            except EngineNotReadyError:
                pass
            self.engine_dead = self.engine_dead or "The engine has stopped."
        return self.engine_dead

    async def admit(self) -> None:
        """Raise unless an inference request may run now: startup (engine, adapter preload,
        first registry read) has finished and the engine is alive."""
        if (dead := await self.dead_reason()) is not None:
            raise EngineDeadError(f"{dead} This server is shutting down.")
        if self.startup_error:
            raise EngineNotReadyError(f"The server failed to start: {self.startup_error}")
        if not self.startup_done:
            raise EngineNotReadyError(f"The server is {STARTING}; retry shortly.")
        if not self.engine.ready:  # shutting down
            raise EngineNotReadyError()

    async def readiness_problem(self) -> str | None:
        """None when the server can serve; else why not."""
        if (dead := await self.dead_reason()) is not None:
            return f"engine dead: {dead}"
        if self.startup_error:
            return f"startup failed: {self.startup_error}"
        if not self.startup_done:
            return STARTING
        try:
            await self.engine.check_health()
        except EngineNotReadyError as e:
            return e.message
        return None

    def degraded(self) -> str | None:
        """Serving, but with a problem an operator should see (e.g. a stale routing table)."""
        return self.resolver.degraded
