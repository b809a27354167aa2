"""The A/B router's part of one server: routing (`ExperimentRouter`), recording
(`ExperimentRecorder`), feedback, and the background loop that runs analysis passes, reports
this replica's state and purges completion ids past their rating window.

Every replica runs analysis passes; the database lock in `ExperimentStore.analysis` lets one at a
time fold new users in and act, so a decision is taken once however many replicas there are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta

from registry.errors import NotFoundError
from registry.experiment_records import ExperimentRecord, Rating
from registry.experiments import ExperimentStore
from server.ab.analysis import analyse
from server.ab.assignment import Assignment
from server.ab.operations import REPORT_EVERY_SECONDS
from server.ab.recorder import ExperimentRecorder, RequestOutcome
from server.ab.router import ExperimentRouter
from server.errors import InvalidRequestError, ResourceNotFoundError
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

DEFAULT_FEEDBACK_TTL_SECONDS = 7 * 86400.0
_PURGE_EVERY_SECONDS = 300.0


def replica_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ABRuntime:
    def __init__(
        self,
        store: ExperimentStore,
        router: ExperimentRouter,
        metrics: ServerMetrics,
        *,
        flush_seconds: float = 1.0,
        analysis_seconds: float = 5.0,
        feedback_ttl_seconds: float = DEFAULT_FEEDBACK_TTL_SECONDS,
    ):
        self.store = store
        self.router = router
        self.metrics = metrics
        self.recorder = ExperimentRecorder(store, metrics, flush_seconds=flush_seconds)
        self.replica = replica_id()
        self._analysis_seconds = analysis_seconds
        self._feedback_ttl = feedback_ttl_seconds
        self._flush_seconds = flush_seconds
        self._task: asyncio.Task | None = None
        self._reported: dict[int, tuple[str, str]] = {}
        self._last_report = 0.0
        self._last_purge = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._last_purge = time.monotonic()  # the first purge after a period, not at startup
        self.recorder.start()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="ab-analysis")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.recorder.close()
        await self.router.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._analysis_seconds)
            try:
                await self.tick()
            except Exception:  # the loop must outlive one bad pass (a database outage)
                log.exception("experiment analysis failed")

    async def tick(self) -> None:
        """One round: report this replica's state, analyse every applied experiment, purge."""
        await self._report_states()
        for experiment in self.router.applied():
            await self.analyse_now(experiment)
        if time.monotonic() - self._last_purge > _PURGE_EVERY_SECONDS:
            self._last_purge = time.monotonic()
            older = datetime.now(UTC) - timedelta(seconds=self._feedback_ttl)
            await asyncio.to_thread(self.store.purge_completions, older_than=older)

    async def analyse_now(self, experiment: ExperimentRecord):
        """Flush what this replica holds, then one analysis pass (which may act)."""
        await self.recorder.flush()
        result = await asyncio.to_thread(analyse, self.store, experiment.id)
        if result is None:
            return None
        counts = result.statistics["srm"]["counts"]
        for variant, users in zip(experiment.variants, counts, strict=False):
            self.metrics.ab_users.labels(
                experiment.name, str(variant.version), str(experiment.id), str(variant.index)
            ).set(users)
        if result.acted:
            self.metrics.ab_decisions.labels(
                experiment.name, str(experiment.id), result.acted
            ).inc()
            log.warning(
                "experiment %d on %s: %s (%s)", experiment.id, experiment.name, result.acted,
                result.decision.reason,
            )  # fmt: skip
        return result

    async def _report_states(self) -> None:
        now = time.monotonic()
        states = {e.id: (state, reason) for e, state, reason in self.router.states()}
        if states == self._reported and now - self._last_report < REPORT_EVERY_SECONDS:
            return
        for experiment_id, (state, reason) in states.items():
            await asyncio.to_thread(
                self.store.heartbeat, experiment_id, self.replica, state=state, reason=reason
            )
        self._reported, self._last_report = states, now

    # -- the request path ---------------------------------------------------------------------

    def on_end(self, experiment: ExperimentRecord, assignment: Assignment):
        def ended(outcome: RequestOutcome) -> None:
            self.recorder.observe(experiment, assignment, outcome)

        return ended

    # -- feedback -----------------------------------------------------------------------------

    async def rate(self, completion_id: str, score: float) -> Rating:
        """Join a rating to the variant that served the completion, on whichever replica."""
        if self.recorder.is_pending(completion_id):
            await self.recorder.flush()
        deadline = time.monotonic() + 2 * self._flush_seconds + 1.0
        while True:  # another replica may not have written its last second yet
            try:
                rating = await asyncio.to_thread(
                    self.store.rate, completion_id, score, ttl_seconds=self._feedback_ttl
                )
            except NotFoundError as e:
                if time.monotonic() >= deadline:
                    raise ResourceNotFoundError(
                        f"No completion {completion_id!r} to rate: it was not served inside an "
                        f"A/B experiment, or it is older than the rating window "
                        f"({self._feedback_ttl:g} s).",
                        param="completion_id",
                    ) from e
                await asyncio.sleep(min(0.25, self._flush_seconds))
                continue
            except ValueError as e:
                raise InvalidRequestError(str(e), param="score") from e
            break
        if not rating.duplicate:
            labels = (rating.name, str(rating.version), str(rating.experiment_id),
                      str(rating.variant))  # fmt: skip
            self.metrics.ab_feedback.labels(*labels).inc()
            self.metrics.ab_feedback_score.labels(*labels).inc(rating.score)
        return rating
