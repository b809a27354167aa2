"""Recording what each experiment's variants did: buffered in memory on the request path, written
to the registry database in one batch transaction about once a second.

The request path only adds to dictionaries (no database call, no lock held across an await);
the flush swaps the buffers and writes per-user aggregates (first exposure, requests, errors,
slow requests, output tokens, first error), per-variant counters and the completion ids that
feedback joins to. A failed write keeps the batch and retries it with the next one, so a short
database outage loses nothing; only past `max_pending_completions` are the oldest completion ids
dropped (counted in `loraplex_ab_records_dropped_total`). Prometheus sees every request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from registry.experiment_records import (
    CompletionDelta,
    CounterDelta,
    ExperimentRecord,
    UserDelta,
)
from registry.experiments import ExperimentStore
from server.ab.assignment import Assignment
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

DEFAULT_FLUSH_SECONDS = 1.0
DEFAULT_MAX_PENDING = 1_000_000


@dataclass(slots=True)
class RequestOutcome:
    """How one request served inside an experiment ended."""

    completion_id: str
    status: int
    seconds: float  # end to end
    ttft: float | None
    output_tokens: int

    @property
    def error(self) -> bool:
        return self.status >= 500


@dataclass(slots=True)
class _User:
    variant: int
    first_seen_at: datetime
    requests: int = 0
    errors: int = 0
    slow: int = 0
    output_tokens: int = 0
    first_error_at: datetime | None = None


@dataclass(slots=True)
class _Counter:
    requests: int = 0
    errors: int = 0
    slow: int = 0
    output_tokens: int = 0
    latency_seconds_sum: float = 0.0
    ttft_seconds_sum: float = 0.0
    unkeyed_requests: int = 0
    unanalysed_requests: int = 0


@dataclass(slots=True)
class _Batch:
    users: dict[tuple[int, str], _User]
    counters: dict[tuple[int, int], _Counter]
    completions: list[CompletionDelta]

    @classmethod
    def empty(cls) -> _Batch:
        return cls({}, {}, [])

    def __len__(self) -> int:
        return len(self.users) + len(self.counters) + len(self.completions)

    def absorb(self, older: _Batch) -> None:
        """Put a batch that failed to write back in front of this one."""
        for key, u in older.users.items():
            mine = self.users.get(key)
            if mine is None:
                self.users[key] = u
                continue
            mine.first_seen_at = min(mine.first_seen_at, u.first_seen_at)
            mine.requests += u.requests
            mine.errors += u.errors
            mine.slow += u.slow
            mine.output_tokens += u.output_tokens
            if u.first_error_at is not None:
                mine.first_error_at = min(filter(None, (mine.first_error_at, u.first_error_at)))
        for key, c in older.counters.items():
            mine = self.counters.setdefault(key, _Counter())
            for name in _Counter.__slots__:
                setattr(mine, name, getattr(mine, name) + getattr(c, name))
        self.completions[:0] = older.completions


class ExperimentRecorder:
    def __init__(
        self,
        store: ExperimentStore,
        metrics: ServerMetrics,
        *,
        flush_seconds: float = DEFAULT_FLUSH_SECONDS,
        max_pending_completions: int = DEFAULT_MAX_PENDING,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self._store = store
        self._metrics = metrics
        self._flush_seconds = flush_seconds
        self._max_pending = max_pending_completions
        self._clock = clock
        self._batch = _Batch.empty()
        self._pending_ids: set[str] = set()  # completion ids not yet written
        self._flush_lock = asyncio.Lock()
        self._writing: set[asyncio.Future] = set()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.recorded = 0  # requests written to the database, for benchmarks and tests

    # -- the request path ---------------------------------------------------------------------

    def observe(
        self, experiment: ExperimentRecord, assignment: Assignment, outcome: RequestOutcome
    ) -> None:
        now = self._clock()
        arrived = now - timedelta(seconds=outcome.seconds)
        variant = assignment.variant
        slo_seconds = experiment.config.get("latency_slo_ms", 10_000.0) / 1000.0
        slow = outcome.seconds > slo_seconds
        counter = self._batch.counters.setdefault((experiment.id, variant.index), _Counter())
        counter.requests += 1
        counter.errors += outcome.error
        counter.slow += slow
        counter.output_tokens += outcome.output_tokens
        counter.latency_seconds_sum += outcome.seconds
        counter.ttft_seconds_sum += outcome.ttft or 0.0
        counter.unkeyed_requests += not assignment.keyed
        counter.unanalysed_requests += not assignment.analysed
        if assignment.analysed and assignment.user_hash is not None:
            key = (experiment.id, assignment.user_hash)
            user = self._batch.users.get(key)
            if user is None:
                user = self._batch.users[key] = _User(variant.index, arrived)
            user.requests += 1
            user.errors += outcome.error
            user.slow += slow
            user.output_tokens += outcome.output_tokens
            if outcome.error and user.first_error_at is None:
                user.first_error_at = now
        self._batch.completions.append(
            CompletionDelta(
                completion_id=outcome.completion_id,
                experiment_id=experiment.id,
                variant=variant.index,
                user_hash=assignment.user_hash,
                analysed=assignment.analysed,
                created_at=now,
            )
        )
        self._pending_ids.add(outcome.completion_id)
        self._trim()
        self._metrics.observe_ab_request(
            adapter=experiment.name, version=variant.version, experiment=experiment.id,
            variant=variant.index, error=outcome.error, seconds=outcome.seconds,
            ttft=outcome.ttft, output_tokens=outcome.output_tokens,
            unanalysed="unkeyed" if not assignment.keyed else (
                None if assignment.analysed else "outside-slice"),
        )  # fmt: skip

    def _trim(self) -> None:
        extra = len(self._batch.completions) - self._max_pending
        if extra > 0:
            dropped = self._batch.completions[:extra]
            del self._batch.completions[:extra]
            self._pending_ids.difference_update(c.completion_id for c in dropped)
            self._metrics.ab_records_dropped.inc(extra)

    def is_pending(self, completion_id: str) -> bool:
        """Served here and not written yet (feedback flushes before it looks it up)."""
        return completion_id in self._pending_ids

    # -- writing ------------------------------------------------------------------------------

    async def flush(self) -> int:
        """Write what is buffered; returns the number of requests written. On failure the batch
        goes back into the buffer (written with the next flush) and the error propagates.

        The write runs to its end even if the caller is cancelled (a server shutting down): a
        write that may have committed is never put back, so nothing is counted twice."""
        async with self._flush_lock:
            batch, self._batch = self._batch, _Batch.empty()
            if not len(batch):
                return 0
            write = asyncio.ensure_future(
                asyncio.to_thread(
                    self._store.record,
                    users=_user_deltas(batch),
                    counters=_counter_deltas(batch),
                    completions=batch.completions,
                )  # fmt: skip
            )
            self._writing.add(write)
            write.add_done_callback(lambda done: self._written(batch, done))
            await asyncio.shield(write)
            return sum(c.requests for c in batch.counters.values())

    def _written(self, batch: _Batch, write: asyncio.Future) -> None:
        """When a write ends: count it, or put its batch back to go with the next one."""
        self._writing.discard(write)
        if write.cancelled() or write.exception() is not None:
            self._batch.absorb(batch)
            self._trim()
            self._metrics.ab_flush_errors.inc()
            return
        requests = sum(c.requests for c in batch.counters.values())
        self._pending_ids.difference_update(c.completion_id for c in batch.completions)
        self.recorded += requests
        self._metrics.ab_records.inc(requests)

    async def run(self) -> None:
        """Flush about every `flush_seconds` until `close()`."""
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                await self.flush()
            except Exception as e:  # kept in the buffer; the next flush retries
                log.warning("cannot record experiment data (kept for the next try): %s", e)
            wait = max(0.0, self._flush_seconds - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=wait)

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self.run(), name="ab-recorder")

    async def close(self) -> None:
        """Stop the flush loop after its current write, then write what is left."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None
        if self._writing:  # a write a cancelled caller left running
            await asyncio.wait(list(self._writing))
        try:
            await self.flush()  # what the last second served
        except Exception as e:
            log.error("experiment data of the last second could not be written: %s", e)


def _user_deltas(batch: _Batch) -> list[UserDelta]:
    return [
        UserDelta(
            experiment_id=exp,
            user_hash=user_hash,
            variant=u.variant,
            first_seen_at=u.first_seen_at,
            requests=u.requests,
            errors=u.errors,
            slow=u.slow,
            output_tokens=u.output_tokens,
            first_error_at=u.first_error_at,
        )  # fmt: skip
        for (exp, user_hash), u in batch.users.items()
    ]


def _counter_deltas(batch: _Batch) -> list[CounterDelta]:
    return [
        CounterDelta(experiment_id=exp, variant=variant, **{k: getattr(c, k) for k in c.__slots__})
        for (exp, variant), c in batch.counters.items()
    ]
