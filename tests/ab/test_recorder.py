"""The recorder's buffer: everything observed is written exactly once, also when the server
stops in the middle of a write, and a failed write is kept for the next one."""

from __future__ import annotations

import asyncio
import threading
import time

from prometheus_client import CollectorRegistry

from server.ab.assignment import Splitter
from server.ab.recorder import ExperimentRecorder, RequestOutcome
from server.metrics import ServerMetrics
from tests.ab.factories import experiment


class SlowStore:
    """Stands in for ExperimentStore.record: slow, optionally failing, counting what lands."""

    def __init__(self, *, delay: float = 0.0, fail_first: int = 0):
        self.delay = delay
        self.fail_first = fail_first
        self.calls = 0
        self.requests = 0
        self.completions: list[str] = []
        self.lock = threading.Lock()

    def record(self, *, users, counters, completions) -> None:
        time.sleep(self.delay)
        with self.lock:
            self.calls += 1
            if self.calls <= self.fail_first:
                raise ConnectionError("database down")
            self.requests += sum(c.requests for c in counters)
            self.completions += [c.completion_id for c in completions]


def _observe(recorder: ExperimentRecorder, n: int, start: int = 0) -> None:
    exp = experiment(ramp=(50.0,))
    splitter = Splitter(exp)
    for i in range(start, start + n):
        assignment = splitter.assign(f"user-{i % 50}")
        recorder.observe(exp, assignment, RequestOutcome(f"c{i}", 200, 0.01, 0.005, 3))


def _recorder(store) -> ExperimentRecorder:
    return ExperimentRecorder(store, ServerMetrics(CollectorRegistry()), flush_seconds=0.05)


def test_stopping_during_a_write_counts_nothing_twice():
    async def scenario(store):
        recorder = _recorder(store)
        recorder.start()
        _observe(recorder, 500)
        await asyncio.sleep(0.1)  # the loop's flush is now inside its slow write
        _observe(recorder, 300, start=500)
        await recorder.close()
        return recorder

    store = SlowStore(delay=0.3)
    recorder = asyncio.run(scenario(store))
    assert store.requests == 800 and sorted(store.completions) == sorted(
        f"c{i}" for i in range(800)
    )
    assert recorder.recorded == 800


def test_a_cancelled_flush_still_accounts_for_its_write():
    async def scenario(store):
        recorder = _recorder(store)
        _observe(recorder, 100)
        flushing = asyncio.create_task(recorder.flush())
        await asyncio.sleep(0.05)
        flushing.cancel()
        await asyncio.sleep(0)
        await recorder.close()
        return recorder

    store = SlowStore(delay=0.2)
    recorder = asyncio.run(scenario(store))
    assert store.requests == 100 and len(store.completions) == 100
    assert recorder.recorded == 100


def test_a_failed_write_is_retried_with_the_next_batch():
    async def scenario(store):
        recorder = _recorder(store)
        recorder.start()
        _observe(recorder, 200)
        await asyncio.sleep(0.3)  # first write fails, the next ones carry it
        _observe(recorder, 50, start=200)
        await recorder.close()
        return recorder

    store = SlowStore(fail_first=1)
    recorder = asyncio.run(scenario(store))
    assert store.requests == 250 and len(set(store.completions)) == 250
    assert recorder.is_pending("c0") is False
