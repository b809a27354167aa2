"""Routing a bare adapter name through its running experiment, on one replica.

An experiment read from the routing snapshot is applied here only once every variant is
downloaded and loaded, and held loaded (a lease per variant for the experiment's life), and only
if the engine can keep every variant in one batch (`--max-loras`): otherwise an arm would be
swapped in and out and its latency would poison the comparison (FACTS.md). Until then the
replica keeps serving the control, reports degraded readiness and retries with backoff. The
request path is a dictionary lookup and a hash: no database call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from registry.experiment_records import ExperimentRecord
from registry.records import VersionRecord
from server.ab.assignment import Assignment, Splitter
from server.adapter_loader import AdapterLoader
from server.engine import AdapterHandle

log = logging.getLogger(__name__)

_MAX_BACKOFF_SECONDS = 30.0
SERVING, WAITING = "serving", "degraded"


@dataclass(slots=True)
class _Applied:
    experiment: ExperimentRecord
    splitter: Splitter
    pins: list[AdapterHandle] = field(default_factory=list)


@dataclass(slots=True)
class _Waiting:
    experiment: ExperimentRecord
    reason: str
    attempts: int
    retry_at: float


class ExperimentRouter:
    def __init__(
        self,
        loader: AdapterLoader,
        *,
        record: Callable[[str, int], Awaitable[VersionRecord]],
        max_loras: int,
        retry_seconds: float = 1.0,
    ):
        self._loader = loader
        self._record = record
        self._max_loras = max_loras
        self._retry = retry_seconds
        self._applied: dict[str, _Applied] = {}
        self._waiting: dict[str, _Waiting] = {}

    # -- following the registry ---------------------------------------------------------------

    async def apply(self, experiments: Mapping[str, ExperimentRecord]) -> None:
        """Make this replica's experiments match the registry's running ones."""
        for name in list(self._applied):
            wanted = experiments.get(name)
            if wanted is None or wanted.id != self._applied[name].experiment.id:
                self._drop(name)
        for name in list(self._waiting):
            wanted = experiments.get(name)
            if wanted is None or wanted.id != self._waiting[name].experiment.id:
                del self._waiting[name]
        for name, experiment in sorted(experiments.items()):
            applied = self._applied.get(name)
            if applied is not None:
                if applied.experiment != experiment:  # a ramp step or a new analysis
                    applied.experiment = experiment
                    applied.splitter = Splitter(experiment)
                continue
            waiting = self._waiting.get(name)
            if waiting is not None and waiting.retry_at > time.monotonic():
                waiting.experiment = experiment
                continue
            await self._try_apply(name, experiment)

    async def retry_due(self) -> None:
        now = time.monotonic()
        for name, waiting in sorted(self._waiting.items()):
            if waiting.retry_at <= now:
                await self._try_apply(name, waiting.experiment)

    async def _try_apply(self, name: str, experiment: ExperimentRecord) -> None:
        problem = self._slot_problem(experiment)
        pins: list[AdapterHandle] = []
        if problem is None:
            try:
                for variant in experiment.variants:
                    record = await self._record(name, variant.version)
                    pins.append(await self._loader.acquire(record))
            except Exception as e:  # one experiment's failure must not stop the others
                problem = f"cannot load {name}@{variant.version}: {e}"
        if problem is not None:
            for handle in pins:
                self._loader.release(handle)
            previous = self._waiting.get(name)
            attempts = previous.attempts + 1 if previous else 1
            delay = min(self._retry * 2**attempts, _MAX_BACKOFF_SECONDS)
            self._waiting[name] = _Waiting(experiment, problem, attempts, time.monotonic() + delay)
            log.error(
                "experiment %d on %s not applied on this replica (the control keeps serving): "
                "%s; next attempt in %.1f s", experiment.id, name, problem, delay,
            )  # fmt: skip
            return
        self._waiting.pop(name, None)
        self._applied[name] = _Applied(experiment, Splitter(experiment), pins)
        log.info("experiment %d on %s applied: %s", experiment.id, name, _describe(experiment))

    def _slot_problem(self, experiment: ExperimentRecord) -> str | None:
        needed = len(experiment.variants)
        if needed > self._max_loras:
            return (
                f"the experiment has {needed} variants but this engine batches at most "
                f"{self._max_loras} adapters (--max-loras); every arm must stay resident, or "
                "swapping would distort its latency: raise --max-loras"
            )
        return None

    def _drop(self, name: str) -> None:
        applied = self._applied.pop(name)
        for handle in applied.pins:
            self._loader.release(handle)
        log.info("experiment %d on %s ended here", applied.experiment.id, name)

    async def close(self) -> None:
        for name in list(self._applied):
            self._drop(name)
        self._waiting.clear()

    # -- the request path ---------------------------------------------------------------------

    def route(self, name: str, user: str | None) -> tuple[ExperimentRecord, Assignment] | None:
        applied = self._applied.get(name)
        if applied is None:
            return None
        return applied.experiment, applied.splitter.assign(user)

    def control_of(self, name: str) -> int | None:
        """While an experiment waits to apply here, its control serves the name."""
        waiting = self._waiting.get(name)
        return waiting.experiment.control.version if waiting is not None else None

    # -- reporting ----------------------------------------------------------------------------

    @property
    def degraded(self) -> str | None:
        reasons = [
            f"experiment {w.experiment.id} on {name} not applied, {name} serves its control "
            f"{name}@{w.experiment.control.version} ({w.attempts} attempts, retrying): {w.reason}"
            for name, w in sorted(self._waiting.items())
        ]
        return "; ".join(reasons) or None

    def states(self) -> list[tuple[ExperimentRecord, str, str]]:
        """(experiment, state, reason) of every experiment this replica knows of."""
        result = [(a.experiment, SERVING, "") for a in self._applied.values()]
        result += [(w.experiment, WAITING, w.reason) for w in self._waiting.values()]
        return result

    def applied(self) -> list[ExperimentRecord]:
        return [a.experiment for a in self._applied.values()]


def _describe(experiment: ExperimentRecord) -> str:
    arms = ", ".join(f"v{v.version} ({v.role})" for v in experiment.variants)
    if experiment.ramp:
        return f"{arms}; candidate share {experiment.ramp[experiment.step]:g} %"
    return f"{arms}; weights {', '.join(f'{v.weight:g}' for v in experiment.variants)}"
