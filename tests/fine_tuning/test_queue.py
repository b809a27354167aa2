"""The job queue in the registry database: concurrent workers never claim the same job
(PostgreSQL row locks with SKIP LOCKED; SQLite's write lock), and cancels before and after a
claim. Store-level: no training."""

from __future__ import annotations

import threading

import pytest

from registry.fine_tuning import FineTuningStore
from registry.store import RegistryStore

JOBS, WORKERS = 40, 4
METHOD = {"type": "supervised", "supervised": {"hyperparameters": {}}}


def make_jobs(store: FineTuningStore, count: int) -> list[str]:
    return [
        store.create_job(model="smollm2", training_file="file-x", suffix="q", seed=0,
                         method=METHOD).id
        for _ in range(count)
    ]  # fmt: skip


def test_workers_draining_one_queue_never_claim_the_same_job(database_url: str) -> None:
    first = RegistryStore.open(database_url)
    created = set(make_jobs(FineTuningStore(first), JOBS))
    stores = [RegistryStore.open(database_url) for _ in range(WORKERS)]
    claimed: dict[str, list[str]] = {f"w{i}": [] for i in range(WORKERS)}
    start = threading.Barrier(WORKERS)

    def drain(name: str, store: RegistryStore) -> None:
        jobs = FineTuningStore(store)
        start.wait()
        while (job := jobs.claim(name)) is not None:
            claimed[name].append(job.id)

    threads = [threading.Thread(target=drain, args=(f"w{i}", s)) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    everything = [job for jobs in claimed.values() for job in jobs]
    assert sorted(everything) == sorted(created)  # each job exactly once
    rows = [FineTuningStore(first).get_job(job) for job in everything]
    assert all(row.worker == name for name, jobs in claimed.items()
               for row in rows if row.id in jobs)  # fmt: skip
    for store in [first, *stores]:
        store.close()


def test_cancel_before_a_claim_ends_the_job_and_after_one_asks_its_worker(
    database_url: str,
) -> None:
    store = RegistryStore.open(database_url)
    jobs = FineTuningStore(store)
    waiting, taken = make_jobs(jobs, 2)
    claimed = jobs.claim("w")
    assert claimed is not None and claimed.id == waiting
    assert jobs.heartbeat(waiting, "w") is False
    assert jobs.request_cancel(taken).status == "cancelled"  # never started: ended at once
    assert jobs.claim("w") is None
    flagged = jobs.request_cancel(waiting)
    assert (flagged.status, flagged.cancel_requested) == ("validating_files", True)
    assert jobs.heartbeat(waiting, "w") is True  # the worker learns it and stops the run
    assert jobs.set_status(waiting, "cancelled").finished_at is not None
    assert jobs.request_cancel(waiting).status == "cancelled"  # finished: left as it is
    store.close()


@pytest.mark.parametrize("limit", [1, 3])
def test_job_pages_follow_the_cursor_newest_first(database_url: str, limit: int) -> None:
    store = RegistryStore.open(database_url)
    jobs = FineTuningStore(store)
    created = make_jobs(jobs, 5)
    seen, after, more = [], None, True
    while more:
        page, more = jobs.list_jobs(after=after, limit=limit)
        seen += [row.id for row in page]
        after = page[-1].id if page else None
    assert seen == created[::-1]
    store.close()


def test_a_job_whose_worker_fell_silent_is_taken_over_and_the_old_worker_told_to_stop(
    database_url: str,
) -> None:
    store = RegistryStore.open(database_url)
    jobs = FineTuningStore(store)
    (job,) = make_jobs(jobs, 1)
    assert jobs.claim("dead").id == job
    jobs.set_status(job, "running")
    assert jobs.claim("alive", stale_seconds=3600) is None  # its worker beat just now
    taken = jobs.claim("alive", stale_seconds=0)
    assert taken is not None and (taken.id, taken.worker) == (job, "alive")
    assert jobs.heartbeat(job, "dead") is True  # the old worker, if it still runs, stops
    assert jobs.heartbeat(job, "alive") is False
    events, _ = jobs.list_events(job, limit=50)
    assert any("from dead" in e.message for e in events)
    store.close()
