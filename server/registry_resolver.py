"""Resolve `model` through the registry: `NAME` (alias production), `NAME@7`, `NAME@alias`.

The routing table (every alias -> version) is read from the registry database and re-read when
its revision changes (polled about every second), so every replica follows promotions and
rollbacks without a restart. A version an alias is about to point at is downloaded and loaded
*before* the new table is used, so no request pays for it; requests already running keep the
version they resolved. If the database is unreachable, the last table keeps serving and
readiness reports the problem. Base-model and local-folder names are delegated to
`LocalAdapters`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from registry.errors import (
    AdapterNotFoundError,
    InvalidReferenceError,
    NotFoundError,
    RegistryError,
)
from registry.records import RoutingSnapshot, VersionRecord
from registry.refs import DEFAULT_ALIAS, parse_ref
from registry.store import RegistryStore
from server.adapter_loader import AdapterLoader
from server.errors import AdapterUnavailableError, ModelNotFoundError
from server.metrics import ServerMetrics
from server.targets import LocalAdapters, Target

log = logging.getLogger(__name__)


class RegistryResolver:
    def __init__(
        self,
        store: RegistryStore,
        loader: AdapterLoader,
        *,
        local: LocalAdapters,
        metrics: ServerMetrics,
        poll_seconds: float = 1.0,
    ):
        self._store = store
        self._loader = loader
        self._local = local
        self._metrics = metrics
        self._poll_seconds = poll_seconds
        self._snapshot: RoutingSnapshot | None = None
        self._records: dict[str, VersionRecord] = {}  # NAME@V -> record; immutable, kept
        self._poller: asyncio.Task | None = None
        self.degraded: str | None = None  # why the routing table may be stale

    # -- lifecycle ----------------------------------------------------------------------------

    async def preload(self) -> None:
        await self._local.preload()
        await self.refresh()
        if self._snapshot is None:
            raise RuntimeError(f"cannot read the registry: {self.degraded}")
        self._poller = asyncio.create_task(self._poll_forever(), name="registry-poller")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            await self.refresh()

    async def refresh(self) -> None:
        """Re-read the routing table if the registry changed; warm new targets, then switch."""
        try:
            revision = await asyncio.to_thread(self._store.revision)
            if self._snapshot is not None and revision == self._snapshot.revision:
                self._set_degraded(None)
                return
            snapshot = await asyncio.to_thread(self._store.routing_snapshot)
            await self._warm(snapshot)
        except RegistryError as e:
            self._set_degraded(f"registry unreadable, serving the last routing table: {e}")
            return
        except Exception as e:  # database drivers raise their own types
            self._set_degraded(f"registry unreadable, serving the last routing table: {e}")
            log.warning("registry poll failed: %s", e)
            return
        self._snapshot = snapshot
        self._metrics.registry_revision.set(snapshot.revision)
        self._set_degraded(None)

    def _set_degraded(self, reason: str | None) -> None:
        if reason and reason != self.degraded:
            self._metrics.registry_poll_errors.inc()
        self.degraded = reason

    async def _warm(self, snapshot: RoutingSnapshot) -> None:
        for (name, _alias), number in sorted(snapshot.aliases.items()):
            record = await self._record(name, number)
            try:
                await self._loader.warm(record)
            except Exception as e:  # one bad version must not block the others' routing
                log.error("cannot warm %s: %s", record.ref, e)

    async def _record(self, name: str, number: int) -> VersionRecord:
        ref = f"{name}@{number}"
        if ref not in self._records:
            self._records[ref] = await asyncio.to_thread(self._store.get_version, name, number)
        return self._records[ref]

    # -- resolution ---------------------------------------------------------------------------

    async def resolve(self, model: str) -> Target:
        if model in self._local.model_names():
            return await self._local.resolve(model)
        record = await self._resolve_record(model)
        handle = await self._loader.acquire(record)
        return Target(served_as=record.ref, adapter=handle, release=self._releaser(handle))

    def _releaser(self, handle) -> Callable[[], None]:
        return lambda: self._loader.release(handle)

    async def _resolve_record(self, model: str) -> VersionRecord:
        try:
            ref = parse_ref(model)
        except InvalidReferenceError as e:
            raise ModelNotFoundError(f"{e}. {self._available()}") from e
        snapshot = self._snapshot
        assert snapshot is not None  # preload() succeeded
        number = ref.version
        if ref.alias is not None:
            number = snapshot.find_alias(ref.name, ref.alias)
        try:
            if number is not None:
                return await self._record(ref.name, number)
            # Not in the routing table (yet): the registry itself has the last word, so a name
            # registered or promoted since the last poll is not refused.
            record = await asyncio.to_thread(self._store.resolve, ref)
            self._records.setdefault(record.ref, record)
            return record
        except AdapterNotFoundError as e:
            raise ModelNotFoundError(
                f"The model {model!r} does not exist. {self._available()}"
            ) from e
        except NotFoundError as e:  # the registry's message says what exists and how to promote
            raise ModelNotFoundError(f"{e}.") from e
        except RegistryError as e:
            raise AdapterUnavailableError(str(e), adapter=model) from e

    def _available(self) -> str:
        return f"Available: {', '.join(self.model_names())}."

    def model_names(self) -> list[str]:
        names = self._local.model_names()
        snapshot = self._snapshot
        if snapshot is None:
            return names
        promoted = sorted({n for (n, a) in snapshot.aliases if a == DEFAULT_ALIAS})
        pinned = [
            f"{n}@{v}"
            for n, latest in sorted(snapshot.latest.items())
            for v in range(1, latest + 1)
        ]
        return [*names, *promoted, *pinned]
