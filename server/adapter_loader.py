"""Load: an adapter version on local disk -> the engine, once, under a stable integer id.

Each `NAME@VERSION` gets its own engine id for the server's lifetime (never reused for other
weights, vLLM #42125) and one lock, so concurrent first requests load it once. Requests hold a
lease while they run; only versions nobody holds are unloaded when more are loaded than the
engine keeps. Download is the disk cache's job (`server.adapter_cache`), not this module's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from registry.records import VersionRecord
from registry.validation import validate_adapter_dir
from server.adapter_cache import AdapterDiskCache
from server.engine import AdapterHandle, Engine
from server.errors import AdapterLoadError
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Loaded:
    handle: AdapterHandle
    sha256: str
    leases: int = 0


class AdapterLoader:
    def __init__(
        self,
        engine: Engine,
        cache: AdapterDiskCache,
        *,
        metrics: ServerMetrics,
        max_loaded: int,
        max_rank: int,
        first_id: int = 1,
    ):
        self._engine = engine
        self._cache = cache
        self._metrics = metrics
        self._max_loaded = max_loaded
        self._max_rank = max_rank
        self._ids = itertools.count(first_id)
        self._id_by_ref: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # least recently used first

    def is_loaded(self, ref: str) -> bool:
        return ref in self._loaded

    async def acquire(self, version: VersionRecord) -> AdapterHandle:
        """Load `version` if needed and lease it; pair with `release`."""
        entry = self._loaded.get(version.ref) or await self._load(version)
        entry.leases += 1
        self._loaded.move_to_end(version.ref)
        return entry.handle

    def release(self, handle: AdapterHandle) -> None:
        entry = self._loaded.get(handle.key)
        if entry is not None and entry.leases > 0:
            entry.leases -= 1

    async def warm(self, version: VersionRecord) -> None:
        """Download and load without leasing: done before traffic is routed to a version."""
        if version.ref not in self._loaded:
            await self._load(version)

    async def _load(self, version: VersionRecord) -> _Loaded:
        lock = self._locks.setdefault(version.ref, asyncio.Lock())
        async with lock:
            if version.ref in self._loaded:  # loaded while we waited
                return self._loaded[version.ref]
            started = time.perf_counter()
            folder = await asyncio.to_thread(self._cache.get, version)
            self._check(version, folder)
            await self._make_room()
            engine_id = self._id_by_ref.setdefault(version.ref, next(self._ids))
            handle = AdapterHandle(key=version.ref, engine_id=engine_id, path=str(folder))
            self._cache.pin(version.sha256)
            try:
                await self._engine.add_adapter(handle)
            except Exception:
                self._cache.unpin(version.sha256)
                self._metrics.observe_adapter_load(version.ref, 0.0, ok=False)
                raise
            entry = self._loaded[version.ref] = _Loaded(handle, version.sha256)
            self._metrics.observe_adapter_load(version.ref, time.perf_counter() - started)
            self._metrics.adapters_loaded.set(len(self._loaded))
            log.info("loaded %s as engine id %d", version.ref, engine_id)
            return entry

    def _check(self, version: VersionRecord, folder: Path) -> None:
        # The registry validated these files at register time against its own rank limit;
        # this engine's limit may be lower.
        report = validate_adapter_dir(folder, max_rank=self._max_rank)
        if not report.ok:
            raise AdapterLoadError(
                f"Adapter {version.ref} cannot be served here: " + "; ".join(report.problems),
                adapter=version.ref,
            )

    async def _make_room(self) -> None:
        for ref, entry in list(self._loaded.items()):
            if len(self._loaded) < self._max_loaded:
                return
            if entry.leases:
                continue
            del self._loaded[ref]
            await self._engine.remove_adapter(entry.handle)
            self._cache.unpin(entry.sha256)
            log.info("unloaded %s (least recently used)", ref)
        self._metrics.adapters_loaded.set(len(self._loaded))
