"""What one running server holds: engine, resolver, service, metrics. Built by `server.app`."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine import Engine
from server.errors import EngineNotReadyError
from server.metrics import ServerMetrics
from server.openai_service import CompletionService
from server.targets import ModelResolver


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

    async def readiness_problem(self) -> str | None:
        """None when the server can serve; else why not."""
        if self.startup_error:
            return f"startup failed: {self.startup_error}"
        if not self.startup_done:
            return "starting: the engine and adapters are loading"
        try:
            await self.engine.check_health()
        except EngineNotReadyError as e:
            return e.message
        return None

    def degraded(self) -> str | None:
        """Serving, but with a problem an operator should see (e.g. a stale routing table)."""
        return self.resolver.degraded
