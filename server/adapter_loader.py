"""Load: an adapter version on local disk -> the engine, once, under a stable integer id.

Each `NAME@VERSION` gets its own engine id for the server's lifetime (never reused for other
weights, vLLM #42125) and one lock, so concurrent first requests download and load it once.
Requests hold a lease while they run; only versions nobody holds are unloaded. Every engine
slot counts, local `--adapter` folders included: making room and adding run under one lock and
start from what the engine says it holds (`Engine.loaded_adapters`), so concurrent cold loads
never overrun the slots or unload one version twice, and a version the engine let go on its
own is loaded again rather than assumed present. When every slot is leased a cold load waits a
little for a release, then answers 429. Download is the disk cache's job
(`server.adapter_cache`), not this module's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from registry.base_model import BaseModel
from registry.fine_tuning import CheckpointRecord
from registry.validation import validate_adapter_dir
from server.adapter_cache import AdapterDiskCache, Servable
from server.engine import AdapterHandle, Engine
from server.errors import AdapterLoadError, OverloadedError
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
        slot_wait_seconds: float = 5.0,
        base: BaseModel | None = None,
    ):
        """`max_loaded`: the engine's adapter slots (vLLM's `max_cpu_loras`), all of them."""
        self._engine = engine
        self._base = base  # the served model: an adapter must fit its layers
        self._cache = cache
        self._metrics = metrics
        self._max_loaded = max_loaded
        self._max_rank = max_rank
        self._slot_wait = slot_wait_seconds
        self._ids = itertools.count(first_id)
        self._id_by_ref: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # per version: one download and load
        self._slots = asyncio.Lock()  # make room and add, one load at a time
        self._released = asyncio.Event()  # set whenever a lease ends
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # least recently used first

    def is_loaded(self, ref: str) -> bool:
        return ref in self._loaded

    async def acquire(self, version: Servable) -> AdapterHandle:
        """Load `version` if needed and lease it; pair with `release`."""
        entry = self._loaded.get(version.ref) or await self._load(version)
        # No await since `_load` returned, so nothing can have unloaded it in between.
        entry.leases += 1
        self._loaded.move_to_end(version.ref)
        self._metrics.adapter_leases.inc()
        return entry.handle

    def release(self, handle: AdapterHandle) -> None:
        entry = self._loaded.get(handle.key)
        if entry is not None and entry.leases > 0:
            entry.leases -= 1
            self._metrics.adapter_leases.dec()
            self._released.set()

    async def warm(self, version: Servable) -> None:
        """Download and load without leasing: done before traffic is routed to a version."""
        if version.ref not in self._loaded:
            await self._load(version)

    async def _load(self, version: Servable) -> _Loaded:
        lock = self._locks.setdefault(version.ref, asyncio.Lock())
        async with lock:
            if version.ref in self._loaded:  # loaded while we waited
                return self._loaded[version.ref]
            started = time.perf_counter()
            try:
                folder = await self._fetch(version)
            except Exception:
                self._metrics.observe_adapter_load(version.ref, 0.0, ok=False)
                raise
            engine_id = self._id_by_ref.setdefault(version.ref, next(self._ids))
            handle = AdapterHandle(key=version.ref, engine_id=engine_id, path=str(folder))
            try:
                entry = await self._add(handle, version.sha256)
            except BaseException:
                self._cache.unpin(version.sha256)
                self._metrics.observe_adapter_load(version.ref, 0.0, ok=False)
                raise
            self._metrics.observe_adapter_load(version.ref, time.perf_counter() - started)
            log.info("loaded %s as engine id %d", version.ref, engine_id)
            return entry

    async def _fetch(self, version: Servable) -> Path:
        """The version's folder, pinned in the disk cache and checked; a caller cancelled while
        the worker thread runs still gets its pin undone."""
        fetch = asyncio.ensure_future(asyncio.to_thread(self._fetch_checked, version))
        try:
            return await asyncio.shield(fetch)
        except asyncio.CancelledError:
            fetch.add_done_callback(lambda f: self._unpin_if_fetched(f, version.sha256))
            raise

    def _unpin_if_fetched(self, fetch: asyncio.Future, sha256: str) -> None:
        if not fetch.cancelled() and fetch.exception() is None:
            self._cache.unpin(sha256)

    def _fetch_checked(self, version: Servable) -> Path:
        folder = self._cache.acquire(version)
        if isinstance(version, CheckpointRecord):
            folder = folder / version.adapter_path
        # The registry validated these files at register time against its own rank limit;
        # this engine's limit may be lower.
        report = validate_adapter_dir(folder, max_rank=self._max_rank, base=self._base)
        if not report.ok:
            self._cache.unpin(version.sha256)
            raise AdapterLoadError(
                f"Adapter {version.ref} cannot be served here: " + "; ".join(report.problems),
                adapter=version.ref,
            )
        return folder

    async def _add(self, handle: AdapterHandle, sha256: str) -> _Loaded:
        async with self._slots:
            occupied = await self._make_room()
            await self._engine.add_adapter(handle)
            entry = self._loaded[handle.key] = _Loaded(handle, sha256)
            self._metrics.adapters_loaded.set(len(occupied) + 1)
            return entry

    async def _make_room(self) -> set[int]:
        """Unload least recently used unleased versions until a slot is free; wait a little for
        a lease to end when none can go. Returns the engine ids that stay. Under `_slots`."""
        deadline = time.monotonic() + self._slot_wait
        while True:
            occupied = await self._occupied()
            if len(occupied) < self._max_loaded:
                return occupied
            victim = next((ref for ref, e in self._loaded.items() if not e.leases), None)
            if victim is not None:
                await self._unload(victim, why="least recently used")
                continue
            left = deadline - time.monotonic()
            self._released.clear()
            try:
                if left <= 0:
                    raise TimeoutError
                await asyncio.wait_for(self._released.wait(), left)
            except TimeoutError:
                raise OverloadedError(self._no_slot_message(occupied)) from None

    async def _occupied(self) -> set[int]:
        """Engine ids in use: what the engine holds, plus leased versions it let go (vLLM
        reloads those from their folder when they run). Unleased versions the engine no longer
        holds are forgotten here, so the loader's view follows the engine's."""
        held = set(await self._engine.loaded_adapters())
        for ref, entry in list(self._loaded.items()):
            if entry.handle.engine_id not in held and not entry.leases:
                del self._loaded[ref]
                self._cache.unpin(entry.sha256)
                log.info("%s is no longer in the engine; it will be loaded again when used", ref)
        tracked = {e.handle.engine_id for e in self._loaded.values()}
        for ref, engine_id in self._id_by_ref.items():
            if engine_id in held and engine_id not in tracked:  # a load cancelled mid-add
                await self._engine.remove_adapter(AdapterHandle(ref, engine_id, path=""))
                held.discard(engine_id)
        occupied = held | tracked
        self._metrics.adapters_loaded.set(len(occupied))
        return occupied

    async def _unload(self, ref: str, *, why: str) -> None:
        entry = self._loaded.pop(ref)
        try:
            await self._engine.remove_adapter(entry.handle)
        finally:
            self._cache.unpin(entry.sha256)
        log.info("unloaded %s (%s)", ref, why)

    def _no_slot_message(self, occupied: set[int]) -> str:
        ours = sum(1 for e in self._loaded.values() if e.handle.engine_id in occupied)
        return (
            f"All {self._max_loaded} adapter slots of this server are in use ({ours} registry "
            f"versions held by running requests, {len(occupied) - ours} local adapters); "
            "retry shortly."
        )
