"""Resolve `model` through the registry: `NAME` (alias production), `NAME@7`, `NAME@alias`.

The routing table (every alias -> version) is read from the registry database and re-read when
its revision changes (polled about every second), so every replica follows promotions and
rollbacks without a restart. Only aliases whose target changed are warmed, and each switches on
this replica once its new version is downloaded and loaded, so no request pays for it. A
version that cannot be warmed (artifact store down, rank over this engine's limit) never gets
the alias's traffic: the alias keeps its previous target here, the failure is counted
(`loraplex_adapter_warmup_failures_total`) and reported as degraded readiness, and the warm-up
is retried with backoff. Requests already running keep the version they resolved. If the
database is unreachable the last table keeps serving, and what needs the database answers 503
saying so (never a false 404). Names found missing are remembered for a second. Base-model and
local-folder names are delegated to `LocalAdapters`. A fine-tuning job's `ft:` model id is its
registered NAME@V; its checkpoints' ids (`ft:...:ckpt-step-N`) are served from their uploaded
blobs, which hold each one's adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from registry.errors import (
    AdapterNotFoundError,
    InvalidReferenceError,
    NotFoundError,
    RegistryError,
    RegistryUnavailableError,
)
from registry.fine_tuning import (
    FINE_TUNED_PREFIX,
    is_checkpoint_model,
    resolve_checkpoint,
    resolve_fine_tuned,
)
from registry.records import RoutingSnapshot, VersionRecord
from registry.refs import DEFAULT_ALIAS, AdapterRef, parse_ref
from registry.store import RegistryStore
from server.ab.router import ExperimentRouter
from server.ab.runtime import ABRuntime
from server.adapter_loader import AdapterLoader
from server.engine import AdapterHandle
from server.errors import AdapterUnavailableError, ModelNotFoundError
from server.metrics import ServerMetrics
from server.targets import LocalAdapters, Target

log = logging.getLogger(__name__)

AliasKey = tuple[str, str]  # (name, alias)

_NAMES_SHOWN = 20  # in a 404's "Available: ..." list; GET /v1/models has them all
_REASONS_SHOWN = 5  # pending warm-ups spelled out in the degraded reason
_MAX_BACKOFF_SECONDS = 30.0


@dataclass(slots=True)
class _Pending:
    """An alias whose new target could not be warmed yet."""

    version: int
    reason: str
    attempts: int
    retry_at: float  # time.monotonic()


class _RecentMisses:
    """Not-found answers of the last `ttl` seconds (at most `size`), so a mistyped name does
    not cost a database query per request. Cleared whenever the registry changes."""

    def __init__(self, *, ttl: float, size: int = 1024):
        self._ttl = ttl
        self._size = size
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def get(self, model: str) -> str | None:
        found = self._entries.get(model)
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]

    def put(self, model: str, message: str) -> None:
        self._entries[model] = (time.monotonic() + self._ttl, message)
        self._entries.move_to_end(model)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


class RegistryResolver:
    def __init__(
        self,
        store: RegistryStore,
        loader: AdapterLoader,
        *,
        local: LocalAdapters,
        metrics: ServerMetrics,
        poll_seconds: float = 1.0,
        miss_ttl_seconds: float = 1.0,
        max_loras: int | None = None,
        experiments: bool = True,
        flush_seconds: float = 1.0,
        analysis_seconds: float = 5.0,
        feedback_ttl_seconds: float | None = None,
    ):
        """`experiments`: route bare names through running A/B experiments (and record and
        analyse them); `max_loras`: adapters the engine batches at once (every arm of an
        experiment must fit)."""
        self._store = store
        self._loader = loader
        self._local = local
        self._metrics = metrics
        self._poll_seconds = poll_seconds
        self._snapshot: RoutingSnapshot | None = None  # the registry's table, as last read
        self._routes: dict[AliasKey, int] = {}  # what this replica serves: warmed targets only
        self._pending: dict[AliasKey, _Pending] = {}
        self._records: dict[str, VersionRecord] = {}  # NAME@V -> record; immutable, kept
        self._misses = _RecentMisses(ttl=miss_ttl_seconds)
        self._poller: asyncio.Task | None = None
        self._db_problem: str | None = None
        self.experiments: ABRuntime | None = None
        if experiments:
            router = ExperimentRouter(
                loader, record=self._record, max_loras=max_loras or 1 << 30,
                retry_seconds=poll_seconds,
            )  # fmt: skip
            extra = (
                {}
                if feedback_ttl_seconds is None
                else {"feedback_ttl_seconds": feedback_ttl_seconds}
            )
            self.experiments = ABRuntime(
                store.experiments, router, metrics, flush_seconds=flush_seconds,
                analysis_seconds=analysis_seconds, **extra,
            )  # fmt: skip

    # -- lifecycle ----------------------------------------------------------------------------

    async def preload(self) -> None:
        await self._local.preload()
        await self.refresh()
        if self._snapshot is None:
            raise RuntimeError(f"cannot read the registry: {self._db_problem}")
        self._poller = asyncio.create_task(self._poll_forever(), name="registry-poller")
        if self.experiments is not None:
            self.experiments.start()

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self.experiments is not None:
            await self.experiments.close()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            try:
                await self.refresh()
            except Exception:  # the poller must outlive any one bad refresh
                log.exception("routing refresh failed")

    @property
    def degraded(self) -> str | None:
        """Why this replica's routing differs from the registry's, or may be stale."""
        reasons = [self._db_problem] if self._db_problem else []
        pending = sorted(self._pending.items())
        reasons += [self._pending_reason(key, p) for key, p in pending[:_REASONS_SHOWN]]
        if len(pending) > _REASONS_SHOWN:
            reasons.append(f"and {len(pending) - _REASONS_SHOWN} more aliases waiting to warm")
        if self.experiments is not None and (waiting := self.experiments.router.degraded):
            reasons.append(waiting)
        return "; ".join(reasons) or None

    def _pending_reason(self, key: AliasKey, pending: _Pending) -> str:
        name, alias = key
        current = self._routes.get(key)
        stays = f"stays on {name}@{current}" if current is not None else "has no target yet"
        return (
            f"{name}@{alias} {stays}: cannot warm {name}@{pending.version} "
            f"({pending.attempts} attempts, retrying): {pending.reason}"
        )

    # -- routing refresh ----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read the routing table if the registry changed, warm what changed and switch each
        alias once warm; retry warm-ups that failed before, when their backoff is over."""
        snapshot = await self._read_snapshot()
        if snapshot is not None:
            await self._apply(snapshot)
        now = time.monotonic()
        due = [(k, p.version) for k, p in sorted(self._pending.items()) if p.retry_at <= now]
        if due:
            await self._switch(due)
        if self.experiments is not None:
            await self.experiments.router.retry_due()

    async def _read_snapshot(self) -> RoutingSnapshot | None:
        """The registry's table if it changed since the last read, else None."""
        try:
            revision = await asyncio.to_thread(self._store.revision)
            if self._snapshot is not None and revision == self._snapshot.revision:
                self._db_problem = None
                return None
            snapshot = await asyncio.to_thread(self._store.routing_snapshot)
        except Exception as e:  # RegistryError, or whatever a driver raised: keep serving
            self._db_problem = f"registry unreadable, serving the last routing table: {e}"
            self._metrics.registry_poll_errors.inc()
            log.warning("registry poll failed: %s", e)
            return None
        self._db_problem = None
        return snapshot

    async def _apply(self, snapshot: RoutingSnapshot) -> None:
        self._misses.clear()  # a name missing a moment ago may exist now
        for key in set(self._routes) - set(snapshot.aliases):
            del self._routes[key]
        for key, pending in list(self._pending.items()):
            if snapshot.aliases.get(key) != pending.version:  # moved on, or back to what we serve
                del self._pending[key]
        self._snapshot = snapshot
        now = time.monotonic()
        changed = [
            (key, version)
            for key, version in sorted(snapshot.aliases.items())
            if self._routes.get(key) != version
            and not (key in self._pending and self._pending[key].retry_at > now)
        ]
        await self._switch(changed)
        if self.experiments is not None:
            await self.experiments.router.apply(snapshot.experiments)
        self._metrics.registry_revision.set(snapshot.revision)  # warmed (or pending) by now

    async def _switch(self, targets: list[tuple[AliasKey, int]]) -> None:
        """Warm each distinct version once; aliases whose version is warm switch to it."""
        outcome: dict[str, Exception | None] = {}
        for key, version in targets:
            ref = f"{key[0]}@{version}"
            if ref not in outcome:
                outcome[ref] = await self._warm(key[0], version)
            if (error := outcome[ref]) is None:
                if self._pending.pop(key, None) is not None:
                    log.info("%s@%s now serves %s (warm-up succeeded)", *key, ref)
                self._routes[key] = version
            else:
                self._warm_failed(key, version, error)

    async def _warm(self, name: str, version: int) -> Exception | None:
        try:
            await self._loader.warm(await self._record(name, version))
        except Exception as e:  # one bad version must not block the others' routing
            self._metrics.adapter_warmup_failures.labels(f"{name}@{version}").inc()
            return e
        return None

    def _warm_failed(self, key: AliasKey, version: int, error: Exception) -> None:
        previous = self._pending.get(key)
        attempts = previous.attempts + 1 if previous and previous.version == version else 1
        delay = min(self._poll_seconds * 2**attempts, _MAX_BACKOFF_SECONDS)
        self._pending[key] = _Pending(version, str(error), attempts, time.monotonic() + delay)
        log.error(
            "%s; next attempt in %.1f s", self._pending_reason(key, self._pending[key]), delay
        )

    async def _record(self, name: str, number: int) -> VersionRecord:
        ref = f"{name}@{number}"
        if ref not in self._records:
            self._records[ref] = await asyncio.to_thread(self._store.get_version, name, number)
        return self._records[ref]

    # -- resolution ---------------------------------------------------------------------------

    async def resolve(self, model: str, *, user: str | None = None) -> Target:
        if model in self._local.model_names():
            return await self._local.resolve(model)
        if is_checkpoint_model(model):  # a fine-tuning job's checkpoint, served from its blob
            try:
                checkpoint = await asyncio.to_thread(resolve_checkpoint, self._store, model)
            except NotFoundError as e:
                raise ModelNotFoundError(f"{e}. {self._available()}") from e
            handle = await self._loader.acquire(checkpoint)
            return Target(served_as=checkpoint.ref, adapter=handle, release=self._releaser(handle))
        if model.startswith(FINE_TUNED_PREFIX):  # a fine-tuning job's result: its NAME@V
            try:
                model = await asyncio.to_thread(resolve_fine_tuned, self._store, model)
            except NotFoundError as e:
                raise ModelNotFoundError(f"{e}. {self._available()}") from e
        if self.experiments is not None and "@" not in model:  # NAME@V and NAME@alias bypass
            routed = self.experiments.router.route(model, user)
            if routed is not None:
                experiment, assignment = routed
                record = await self._record(model, assignment.variant.version)
                handle = await self._loader.acquire(record)
                return Target(
                    served_as=record.ref, adapter=handle, release=self._releaser(handle),
                    assignment=assignment,
                    on_end=self.experiments.on_end(experiment, assignment),
                )  # fmt: skip
            control = self.experiments.router.control_of(model)
            if control is not None:  # an experiment not applied here yet: its control serves
                model = f"{model}@{control}"
        record = await self._resolve_record(model)
        handle = await self._loader.acquire(record)
        return Target(served_as=record.ref, adapter=handle, release=self._releaser(handle))

    def _releaser(self, handle: AdapterHandle) -> Callable[[], None]:
        released = False

        def release() -> None:  # once, however many paths end the request
            nonlocal released
            if not released:
                released = True
                self._loader.release(handle)

        return release

    async def _resolve_record(self, model: str) -> VersionRecord:
        try:
            ref = parse_ref(model)
        except InvalidReferenceError as e:
            raise ModelNotFoundError(f"{e}. {self._available()}") from e
        if self._snapshot is None:
            raise AdapterUnavailableError(
                "The routing table is not loaded yet; retry shortly.", adapter=model
            )
        if (missing := self._misses.get(model)) is not None:
            raise ModelNotFoundError(missing)
        number = ref.version if ref.alias is None else self._route(ref.name, ref.alias)
        try:
            if number is not None:
                return await self._record(ref.name, number)
            # Not in the routing table (yet): the registry itself has the last word, so a name
            # registered or promoted since the last poll is not refused.
            record = await asyncio.to_thread(self._store.resolve, ref)
        except NotFoundError as e:
            message = self._not_found(model, e)
            self._misses.put(model, message)
            raise ModelNotFoundError(message) from e
        except RegistryUnavailableError as e:  # say so; never guess a 404 (or fail with a 500)
            raise AdapterUnavailableError(self._unavailable(model, ref, e), adapter=model) from e
        except RegistryError as e:
            raise AdapterUnavailableError(f"{e}", adapter=model) from e
        self._records.setdefault(record.ref, record)
        return record

    def _route(self, name: str, alias: str) -> int | None:
        """The version this replica serves for the alias: its warmed target, else (an alias new
        since its warm-up failed) the version it should get, tried on demand."""
        key = (name, alias)
        if key in self._routes:
            return self._routes[key]
        pending = self._pending.get(key)
        return pending.version if pending is not None else None

    def _not_found(self, model: str, error: NotFoundError) -> str:
        if isinstance(error, AdapterNotFoundError):
            return f"The model {model!r} does not exist. {self._available()}"
        return f"{error}."  # the registry's message says what exists and how to promote

    def _unavailable(self, model: str, ref: AdapterRef, error: RegistryUnavailableError) -> str:
        snapshot = self._snapshot
        known = snapshot is not None and ref.name in snapshot.latest
        if not known:
            what = f"this server cannot tell whether {model!r} exists"
        else:
            what = f"{model!r} cannot be resolved here now (this server has not served it yet)"
        log.warning("cannot resolve %r: the registry is unavailable: %s", model, error)
        return f"The adapter registry is unavailable, so {what}; retry shortly."

    def _available(self) -> str:
        names = self.model_names()
        shown = ", ".join(names[:_NAMES_SHOWN])
        more = len(names) - _NAMES_SHOWN
        tail = f" and {more} more (GET /v1/models lists them all)" if more > 0 else ""
        return f"Available: {shown}{tail}."

    def model_names(self) -> list[str]:
        names = self._local.model_names()
        snapshot = self._snapshot
        if snapshot is None:
            return names
        aliased = set(self._routes) | set(self._pending)
        promoted = sorted(
            {n for (n, a) in aliased if a == DEFAULT_ALIAS} | set(snapshot.experiments)
        )
        pinned = [
            f"{n}@{v}"
            for n, latest in sorted(snapshot.latest.items())
            for v in range(1, latest + 1)
        ]
        return [*names, *promoted, *pinned]
