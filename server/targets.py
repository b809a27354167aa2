"""What serves a request: the `model` string resolved to the base model or an adapter handle.

`LocalAdapters` serves the base model plus adapters given as local folders (`--adapter NAME=PATH`):
each is validated, given a stable engine id and preloaded with `add_adapter` before the server
reports ready, so no adapter reaches `generate` unvetted. A registry-backed resolver implements
the same `ModelResolver` protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from registry.base_model import BaseModel
from registry.validation import validate_adapter_dir
from server.engine import AdapterHandle, Engine
from server.errors import ModelNotFoundError
from server.metrics import ServerMetrics

if TYPE_CHECKING:
    from server.ab.assignment import Assignment

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Target:
    served_as: str  # what the response's `model` field says
    adapter: AdapterHandle | None
    release: Callable[[], None] | None = None  # ends the request's lease on the adapter
    # Inside an A/B experiment: the assignment, and what records how the request ended.
    assignment: Assignment | None = None
    on_end: Callable[[Any], None] | None = None

    def done(self) -> None:
        if self.release is not None:
            self.release()


class ModelResolver(Protocol):
    async def resolve(self, model: str, *, user: str | None = None) -> Target:
        """Raise `ModelNotFoundError` listing what exists when `model` names nothing. `user`
        is the sticky A/B key (OpenAI `user`, else header x-loraplex-user)."""

    def model_names(self) -> list[str]: ...

    async def preload(self) -> None:
        """Load what must be loaded before the server reports ready."""

    async def close(self) -> None: ...

    @property
    def degraded(self) -> str | None:
        """Why routing may be stale (e.g. registry unreachable); None when all is well."""


def parse_adapter_option(value: str) -> tuple[str, Path]:
    """`NAME=PATH` -> (NAME, PATH); raises ValueError with what was expected."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"expected NAME=PATH, got {value!r}")
    if "@" in name or "/" in name:
        raise ValueError(f"adapter name {name!r} must not contain '@' or '/'")
    return name, Path(path).expanduser().resolve()


class LocalAdapters:
    """Base model plus a fixed set of adapter folders, all loaded at start."""

    def __init__(
        self,
        engine: Engine,
        *,
        base_name: str,
        adapters: dict[str, Path],
        metrics: ServerMetrics,
    ):
        self._engine = engine
        self._base = Target(served_as=base_name, adapter=None)
        self._metrics = metrics
        self._handles = {
            name: AdapterHandle(key=name, engine_id=i, path=str(path))
            for i, (name, path) in enumerate(sorted(adapters.items()), start=1)
        }
        if base_name in self._handles:
            raise ValueError(f"adapter name {base_name!r} is the base model's served name")

    def validate(self, *, max_rank: int, base: BaseModel | None = None) -> None:
        """Check every adapter folder; raise one error listing every problem of every folder."""
        problems: list[str] = []
        for name, handle in self._handles.items():
            report = validate_adapter_dir(Path(handle.path), max_rank=max_rank, base=base)
            problems += [f"{name}: {p}" for p in report.problems]
        if problems:
            raise ValueError("invalid adapters:\n  " + "\n  ".join(problems))

    async def preload(self) -> None:
        for handle in self._handles.values():
            started = time.perf_counter()
            await self._engine.add_adapter(handle)
            self._metrics.observe_adapter_load(handle.key, time.perf_counter() - started)
            log.info("adapter %s loaded as engine id %d", handle.key, handle.engine_id)

    async def resolve(self, model: str, *, user: str | None = None) -> Target:
        if model == self._base.served_as:
            return self._base
        handle = self._handles.get(model)
        if handle is None:
            raise ModelNotFoundError(
                f"The model {model!r} does not exist. Available: {', '.join(self.model_names())}."
            )
        return Target(served_as=handle.key, adapter=handle)

    def model_names(self) -> list[str]:
        return [self._base.served_as, *self._handles]

    async def close(self) -> None:
        pass

    @property
    def degraded(self) -> str | None:
        return None
