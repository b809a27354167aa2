"""Experiments' storage on SQLite and PostgreSQL: start, read and end (with the alias outcome and
its history), buffered recording and feedback that leave the revision alone, the decision pass's
reads, marks and lock, and the routing snapshot's running experiments."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from registry.errors import (
    AdapterNotFoundError,
    CompletionNotFoundError,
    ExperimentConflictError,
    ExperimentNotFoundError,
    ExperimentNotRunningError,
    InvalidExperimentError,
    InvalidFeedbackError,
    VersionNotFoundError,
)
from registry.experiment_records import (
    CompletionDelta,
    CounterDelta,
    ExperimentRecord,
    UserDelta,
    VariantSpec,
)
from registry.store import RegistryStore, VersionSpec

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
AB = [VariantSpec(1, 50), VariantSpec(2, 50)]


@pytest.fixture
def store(database_url: str) -> Iterator[RegistryStore]:
    opened = RegistryStore.open(database_url)
    yield opened
    opened.close()


@pytest.fixture
def adapter(store: RegistryStore) -> Callable[..., str]:
    """Register `versions` versions of `name` (no artifacts: the store keeps sha256s only)."""

    def make(name: str, *, versions: int = 2, production: int | None = 1) -> str:
        for number in range(versions):
            spec = VersionSpec(
                sha256=f"{name}{number}".ljust(64, "0")[:64],
                size_bytes=1,
                base_model="base",
                rank=8,
                alpha=16.0,
                target_modules=("q_proj",),
            )
            store.add_version(name, spec, actor="ana")
        if production is not None:
            store.promote(name, production, actor="ana", reason="release")
        return name

    return make


def start(store: RegistryStore, name: str, **kwargs: object) -> ExperimentRecord:
    kwargs.setdefault("variants", AB)
    kwargs.setdefault("ramp", [1, 5, 10, 25, 50])
    kwargs.setdefault("config", {"alpha": 0.05})
    kwargs.setdefault("actor", "ana")
    return store.experiments.start(name, **kwargs)  # type: ignore[arg-type]


def user(experiment: ExperimentRecord, key: str, variant: int, **kwargs: object) -> UserDelta:
    kwargs.setdefault("first_seen_at", T0)
    return UserDelta(experiment.id, key, variant, **kwargs)  # type: ignore[arg-type]


def test_start_and_read_back(store, adapter):
    adapter("chat", versions=3)
    experiment = start(store, "chat", reason="try v2")
    assert experiment.running and experiment.status == "running" and experiment.step == 0
    assert [(v.index, v.version, v.weight, v.role) for v in experiment.variants] == [
        (0, 1, 50.0, "control"),
        (1, 2, 50.0, "candidate"),
    ]
    assert experiment.control.version == 1 and experiment.variant(2).index == 1
    with pytest.raises(KeyError):
        experiment.variant(3)
    assert len(experiment.salt) == 32 and experiment.hash_version == 1
    assert experiment.ramp == (1.0, 5.0, 10.0, 25.0, 50.0)
    assert experiment.config == {"alpha": 0.05} and experiment.created_at.tzinfo is not None
    assert store.experiments.get(experiment.id) == experiment
    assert store.experiments.running("chat") == experiment
    assert store.experiments.latest("chat") == experiment
    assert store.experiments.list() == [experiment]
    assert store.experiments.list(name="chat", running_only=True) == [experiment]
    assert experiment.to_json()["variants"][1] == {
        "index": 1,
        "version": 2,
        "weight": 50.0,
        "role": "candidate",
    }
    [event] = store.experiments.events(experiment.id)
    assert (event.kind, event.step, event.actor, event.reason) == ("start", 0, "ana", "try v2")
    assert event.details["ramp"] == [1.0, 5.0, 10.0, 25.0, 50.0]

    store.experiments.end(experiment.id, status="stopped", actor="bo", reason="done", details={})
    assert store.experiments.running("chat") is None
    again = start(store, "chat", variants=[VariantSpec(1, 1), VariantSpec(3, 1)], ramp=None)
    assert again.salt != experiment.salt and again.ramp is None
    assert store.experiments.latest("chat") == again
    assert [e.id for e in store.experiments.list(name="chat")] == [experiment.id, again.id]
    assert store.experiments.list(running_only=True) == [again]
    assert store.experiments.get(experiment.id).status == "stopped"


def test_missing_things_say_what_exists(store, adapter):
    with pytest.raises(ExperimentNotFoundError, match="no experiment 7; no experiment has been"):
        store.experiments.get(7)
    adapter("quiet")
    with pytest.raises(ExperimentNotFoundError, match="quiet has no experiments; start one"):
        store.experiments.latest("quiet")
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'ghost'"):
        store.experiments.running("ghost")
    experiment = start(store, "quiet")
    with pytest.raises(ExperimentNotFoundError, match=f"experiments: {experiment.id}"):
        store.experiments.events(experiment.id + 1)


def test_one_running_experiment_per_name(store, adapter):
    adapter("solo", versions=3)
    first = start(store, "solo")
    with pytest.raises(ExperimentConflictError) as caught:
        start(store, "solo", variants=[VariantSpec(1, 1), VariantSpec(3, 1)])
    message = str(caught.value)
    assert f"experiment {first.id} running (versions 1 vs 2" in message
    assert message.endswith("loraplex ab stop solo")
    assert store.experiments.list(name="solo") == [first]
    adapter("other")
    assert start(store, "other").running  # another name is unaffected


def test_a_bad_plan_reports_every_problem(store, adapter):
    adapter("plan")
    before = store.revision()
    with pytest.raises(InvalidExperimentError) as caught:
        start(
            store,
            "plan",
            variants=[VariantSpec(1, 0), VariantSpec(1, -2)],
            ramp=[5, 5, 60],
            config={"x": object()},
        )
    problems = caught.value.problems
    assert len(problems) == 5, problems
    assert "repeated: 1" in problems[0]
    assert "weight must be > 0, got 0" in problems[1] and "got -2" in problems[2]
    assert "outside: 60" in problems[3] and "config must be plain JSON" in problems[4]
    with pytest.raises(InvalidExperimentError, match=r"1 problem.*at least 2 variants, got 1"):
        start(store, "plan", variants=[VariantSpec(1, 1)])
    with pytest.raises(InvalidExperimentError, match="must strictly increase, got 10, 5"):
        start(store, "plan", ramp=[10, 5])
    with pytest.raises(VersionNotFoundError, match=r"^plan has no versions 7, 9; versions: 1, 2$"):
        start(store, "plan", variants=[VariantSpec(7, 1), VariantSpec(1, 1), VariantSpec(9, 1)])
    assert store.experiments.list() == [] and store.revision() == before


def test_recording_adds_up_and_keeps_first_exposure(store, adapter):
    adapter("rec")
    experiment = start(store, "rec")
    early, late = T0 - timedelta(minutes=5), T0 + timedelta(minutes=5)
    store.experiments.record(
        users=[
            user(experiment, "u1", 1, requests=2, errors=1, output_tokens=40, first_error_at=late),
            user(experiment, "u2", 0, requests=1, slow=1),
        ],
        counters=[CounterDelta(experiment.id, 1, requests=2, latency_seconds_sum=1.5)],
        completions=[],
    )
    store.experiments.record(
        users=[
            # a later flush says variant 0 and an earlier exposure: the variant stays, the time moves
            user(experiment, "u1", 0, requests=3, first_seen_at=early, first_error_at=T0),
            user(
                experiment, "u2", 0, requests=1, first_seen_at=late, errors=1, first_error_at=late
            ),
            user(experiment, "u2", 0, requests=1, first_seen_at=late),  # merged within a flush
        ],
        counters=[
            CounterDelta(experiment.id, 1, requests=3, errors=1, latency_seconds_sum=2.0),
            CounterDelta(experiment.id, 0, requests=2, unkeyed_requests=1, unanalysed_requests=1),
            CounterDelta(experiment.id, 0, requests=1, ttft_seconds_sum=0.25),
        ],
        completions=[],
    )
    with store.experiments.analysis(experiment.id) as tx:
        by_user = {u.user_hash: u for u in tx.closed_users(closed_before=late, limit=10)}
    u1, u2 = by_user["u1"], by_user["u2"]
    assert (u1.variant, u1.requests, u1.errors, u1.output_tokens) == (1, 5, 1, 40)
    assert (u1.first_seen_at, u1.first_error_at) == (early, T0)
    assert (u2.variant, u2.requests, u2.errors, u2.slow) == (0, 3, 1, 1)
    assert (u2.first_seen_at, u2.first_error_at) == (T0, late)
    totals = store.experiments.totals(experiment.id)
    assert (totals[1].requests, totals[1].errors, totals[1].latency_seconds_sum) == (5, 1, 3.5)
    assert (totals[0].requests, totals[0].unkeyed_requests, totals[0].ttft_seconds_sum) == (
        3,
        1,
        0.25,
    )
    assert totals[0].users == totals[1].users == 1
    assert store.experiments.exposure_counts(experiment.id) == {0: 1, 1: 1}


def test_totals_list_every_variant_even_with_nothing_recorded(store, adapter):
    adapter("empty", versions=3)
    variants = [VariantSpec(1, 1), VariantSpec(2, 1), VariantSpec(3, 1)]
    experiment = start(store, "empty", variants=variants, ramp=None)
    totals = store.experiments.totals(experiment.id)
    assert sorted(totals) == [0, 1, 2]
    assert all(t.requests == 0 and t.users == 0 and t.feedback_sum == 0.0 for t in totals.values())
    assert store.experiments.exposure_counts(experiment.id) == {0: 0, 1: 0, 2: 0}
    with pytest.raises(ExperimentNotFoundError):
        store.experiments.record(
            users=[UserDelta(experiment.id + 99, "x", 0, first_seen_at=T0)],
            counters=[],
            completions=[],
        )
    with pytest.raises(InvalidExperimentError, match="user hash is 1-32 characters"):
        store.experiments.record(users=[user(experiment, "x" * 33, 0)], counters=[], completions=[])


def test_only_lifecycle_changes_bump_the_revision(store, adapter):
    adapter("rev")
    before = store.revision()
    experiment = start(store, "rev")
    assert store.revision() == before + 1
    snapshot = store.routing_snapshot()
    assert snapshot.experiments == {"rev": experiment}
    assert snapshot.to_json()["experiments"]["rev"]["id"] == experiment.id

    started = store.revision()
    store.experiments.record(
        users=[user(experiment, "u", 1, requests=1)],
        counters=[CounterDelta(experiment.id, 1, requests=1)],
        completions=[CompletionDelta("c-rev", experiment.id, 1, "u", True, T0)],
    )
    store.experiments.rate("c-rev", 1.0, ttl_seconds=60, now=T0)
    store.experiments.heartbeat(experiment.id, "replica-a", state="serving")
    with store.experiments.analysis(experiment.id) as tx:
        tx.mark_analysed(["u"])
        tx.mark_errors_counted(["u"])
        tx.save(analysis={"srm": {"log_bf": -0.1}}, decision={"action": "hold"})
    store.experiments.purge_completions(older_than=T0 + timedelta(days=1))
    assert store.revision() == started
    saved = store.experiments.get(experiment.id)
    assert saved.decision == {"action": "hold"} and saved.analysed_at is not None

    with store.experiments.analysis(experiment.id) as tx:
        tx.advance(1, actor="auto", reason="dwell done", details={"users": 200})
        assert tx.experiment.step == 1
    assert store.revision() == started + 1
    assert store.routing_snapshot().experiments["rev"].step == 1
    store.experiments.end(experiment.id, status="stopped", actor="bo", reason="", details={})
    assert store.revision() == started + 2
    assert store.routing_snapshot().experiments == {}
    kinds = [(e.kind, e.step) for e in store.experiments.events(experiment.id)]
    assert kinds == [("start", 0), ("advance", 1), ("end", 1)]


def test_advance_refuses_steps_outside_the_ramp(store, adapter):
    adapter("steps")
    experiment = start(store, "steps", ramp=[5, 50])
    with store.experiments.analysis(experiment.id) as tx:
        for step in (0, 2):
            with pytest.raises(InvalidExperimentError, match=f"step {step} is not after step 0"):
                tx.advance(step, actor="auto", reason="", details={})
        with pytest.raises(InvalidExperimentError, match="no NaN"):
            tx.save(analysis={"e": float("inf")}, decision={})
        tx.advance(1, actor="auto", reason="", details={})
        tx.end(status="stopped", actor="auto", reason="", details={})
        with pytest.raises(ExperimentNotRunningError, match="ended stopped"):
            tx.advance(1, actor="auto", reason="", details={})
    assert store.experiments.get(experiment.id).step == 1


def test_feedback_joins_the_variant_once(store, adapter):
    adapter("fb")
    experiment = start(store, "fb")
    store.experiments.record(
        users=[user(experiment, "u", 1, requests=2)],
        counters=[],
        completions=[
            CompletionDelta("c-1", experiment.id, 1, "u", True, T0),
            CompletionDelta("c-2", experiment.id, 1, "u", True, T0),
            CompletionDelta("c-3", experiment.id, 0, None, False, T0),
        ],
    )
    rating = store.experiments.rate("c-1", 0.75, ttl_seconds=60, now=T0 + timedelta(seconds=30))
    assert (rating.name, rating.variant, rating.version, rating.score) == ("fb", 1, 2, 0.75)
    assert not rating.duplicate and rating.analysed
    again = store.experiments.rate("c-1", 0.0, ttl_seconds=60, now=T0 + timedelta(seconds=31))
    assert again.duplicate and again.score == 0.75
    store.experiments.rate("c-2", 0.25, ttl_seconds=60, now=T0)
    unkeyed = store.experiments.rate("c-3", 1, ttl_seconds=60, now=T0)
    assert (unkeyed.version, unkeyed.analysed) == (1, False)

    with pytest.raises(CompletionNotFoundError, match="no completion 'nope' to rate"):
        store.experiments.rate("nope", 0.5, ttl_seconds=60, now=T0)
    with pytest.raises(CompletionNotFoundError, match="older than 60 s"):
        store.experiments.rate("c-2", 0.5, ttl_seconds=60, now=T0 + timedelta(seconds=61))
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(InvalidFeedbackError, match=r"in \[0, 1\]"):
            store.experiments.rate("c-2", bad, ttl_seconds=60, now=T0)

    totals = store.experiments.totals(experiment.id)
    assert (totals[1].feedback_count, totals[1].feedback_sum) == (2, 1.0)
    assert (totals[0].feedback_count, totals[0].feedback_sum) == (1, 1.0)
    with store.experiments.analysis(experiment.id) as tx:
        [u] = tx.closed_users(closed_before=T0, limit=10)
    assert (u.feedback_count, u.feedback_sum, u.requests) == (2, 1.0, 2)

    assert store.experiments.purge_completions(older_than=T0 + timedelta(seconds=1)) == 3
    with pytest.raises(CompletionNotFoundError):
        store.experiments.rate("c-1", 0.5, ttl_seconds=10**9, now=T0)


def test_closed_users_and_first_errors_come_in_order_and_once(store, adapter):
    adapter("order")
    experiment = start(store, "order")
    minutes = [3, 1, 2, 1, 9]  # "b" and "d" share a first exposure: user_hash breaks the tie
    users = [
        user(
            experiment,
            key,
            i % 2,
            first_seen_at=T0 + timedelta(minutes=m),
            first_error_at=T0 + timedelta(minutes=20 - m) if key != "c" else None,
            errors=int(key != "c"),
        )
        for i, (key, m) in enumerate(zip("edbac", minutes, strict=True))
    ]
    store.experiments.record(users=users, counters=[], completions=[])
    cutoff = T0 + timedelta(minutes=3)
    with store.experiments.analysis(experiment.id) as tx:
        closed = tx.closed_users(closed_before=cutoff, limit=10)
        assert [u.user_hash for u in closed] == ["a", "d", "b", "e"]
        assert [u.user_hash for u in tx.closed_users(closed_before=cutoff, limit=2)] == ["a", "d"]
        tx.mark_analysed(["d", "a"])
        assert [u.user_hash for u in tx.closed_users(closed_before=cutoff, limit=10)] == ["b", "e"]
        errors = tx.new_first_errors(limit=10)
        assert [u.user_hash for u in errors] == ["e", "b", "a", "d"]
        tx.mark_errors_counted(["e", "b"])
        assert tx.exposure_counts() == {0: 3, 1: 2}
    with store.experiments.analysis(experiment.id) as tx:
        assert [u.user_hash for u in tx.new_first_errors(limit=10)] == ["a", "d"]
        assert [u.user_hash for u in tx.closed_users(closed_before=cutoff, limit=10)] == ["b", "e"]


def test_a_failed_pass_changes_nothing(store, adapter):
    adapter("undo")
    experiment = start(store, "undo")
    store.experiments.record(users=[user(experiment, "u", 0)], counters=[], completions=[])
    with pytest.raises(RuntimeError), store.experiments.analysis(experiment.id) as tx:
        tx.mark_analysed(["u"])
        tx.advance(1, actor="auto", reason="", details={})
        raise RuntimeError("the pass failed")
    with store.experiments.analysis(experiment.id) as tx:
        assert [u.user_hash for u in tx.closed_users(closed_before=T0, limit=5)] == ["u"]
        assert tx.experiment.step == 0


def test_one_decision_pass_at_a_time(store, adapter):
    adapter("lock")
    experiment = start(store, "lock")
    entered, release = threading.Event(), threading.Event()

    def first_pass() -> None:
        with store.experiments.analysis(experiment.id) as tx:
            assert tx is not None
            entered.set()
            release.wait(30)

    def second_pass() -> object:
        with store.experiments.analysis(experiment.id) as tx:
            return tx if tx is None else tx.experiment.id

    with ThreadPoolExecutor(max_workers=3) as pool:
        holder = pool.submit(first_pass)
        assert entered.wait(30)
        second = pool.submit(second_pass)
        if store.engine.dialect.name == "postgresql":
            assert second.result(timeout=30) is None  # another replica holds it: skip
            # Recording goes on meanwhile: its foreign-key checks do not wait on the pass's lock.
            during = [user(experiment, "during", 0, requests=1)]
            flush = pool.submit(store.experiments.record, users=during, counters=[], completions=[])
            flush.result(timeout=10)
            release.set()
        else:
            time.sleep(0.5)
            assert not second.done()  # one writer at a time: it waits
            release.set()
            assert second.result(timeout=30) == experiment.id
        holder.result(timeout=30)
    with store.experiments.analysis(experiment.id) as tx:
        assert tx is not None
    store.experiments.end(experiment.id, status="stopped", actor="bo", reason="", details={})
    with store.experiments.analysis(experiment.id) as tx:
        assert tx is None  # not running
    with pytest.raises(ExperimentNotFoundError):
        with store.experiments.analysis(experiment.id + 1):
            pass


def test_ending_moves_the_alias_with_details_in_history(store, adapter):
    adapter("win")
    experiment = start(store, "win")
    ended, move = store.experiments.end(
        experiment.id,
        status="promoted",
        actor="auto",
        reason="feedback better",
        details={"decision": {"action": "promote", "lower": 0.03}},
        to_version=2,
    )
    assert (ended.status, ended.ended_by, ended.end_reason) == (
        "promoted",
        "auto",
        "feedback better",
    )
    assert not ended.running and ended.ended_at is not None
    assert (move.kind, move.from_version, move.to_version, move.changed) == ("promote", 1, 2, True)
    assert move.details["experiment"] == experiment.id
    last = store.history("win")[-1]
    assert (last.kind, last.to_version, last.reason) == ("promote", 2, "feedback better")
    assert last.details == {
        "decision": {"action": "promote", "lower": 0.03},
        "experiment": experiment.id,
        "status": "promoted",
    }
    assert last.to_json()["details"]["experiment"] == experiment.id
    assert store.resolve("win").number == 2
    assert store.rollback("win", actor="bo").to_version == 1  # a promotion like any other
    with pytest.raises(ExperimentNotRunningError, match="ended promoted"):
        store.experiments.end(experiment.id, status="stopped", actor="bo", reason="", details={})
    with pytest.raises(InvalidExperimentError, match="ends as one of"):
        store.experiments.end(experiment.id, status="won", actor="bo", reason="", details={})


def test_an_outcome_without_a_move_is_an_experiment_event(store, adapter):
    adapter("keep", versions=3)
    adapter("fresh", production=None)
    for name, to_version in (("keep", 1), ("keep", None), ("fresh", None)):
        experiment = start(store, name)
        before = len(store.history(name))
        _, move = store.experiments.end(
            experiment.id,
            status="rolled_back",
            actor="auto",
            reason="errors up",
            details={"decision": "rollback"},
            to_version=to_version,
        )
        moves = store.history(name)
        if name == "fresh":  # no alias to record it on
            assert move is None and len(moves) == before
            continue
        assert (move.kind, move.from_version, move.to_version, move.changed) == (
            "experiment",
            1,
            1,
            False,
        )
        assert len(moves) == before + 1 and moves[-1].kind == "experiment"
        assert moves[-1].details["experiment"] == experiment.id
    assert store.resolve("keep").number == 1


def test_experiment_events_do_not_break_rollback(store, adapter):
    adapter("back", production=None)
    store.promote("back", 1, actor="ana")
    store.promote("back", 2, actor="ana")
    experiment = start(store, "back", variants=[VariantSpec(2, 1), VariantSpec(1, 1)])
    store.experiments.end(
        experiment.id, status="stopped", actor="bo", reason="", details={}, to_version=2
    )
    assert store.history("back")[-1].kind == "experiment"
    assert store.rollback("back", actor="bo").to_version == 1


def test_history_shows_what_an_experiment_decided(store, adapter, database_url):
    adapter("cli")
    experiment = start(store, "cli")
    store.experiments.end(
        experiment.id,
        status="promoted",
        actor="auto",
        reason="better",
        details={"decision": {"action": "promote"}},
        to_version=2,
    )
    runner = CliRunner(env={"COLUMNS": "200"})  # one table row per line
    text = runner.invoke(app, ["registry", "history", "cli", "--registry", database_url])
    assert text.exit_code == 0, text.output
    assert f"better (experiment {experiment.id}: promote)" in text.stdout
    assert "release (" not in text.stdout  # a plain promotion has no suffix
    as_json = runner.invoke(
        app, ["registry", "history", "cli", "--registry", database_url, "--json"]
    )
    moves = json.loads(as_json.stdout)
    assert moves[0]["details"] is None and moves[-1]["details"]["experiment"] == experiment.id


def test_replicas_report_their_state(store, adapter):
    adapter("rep")
    experiment = start(store, "rep")
    store.experiments.heartbeat(experiment.id, "b", state="warming")
    store.experiments.heartbeat(experiment.id, "a", state="serving")
    store.experiments.heartbeat(experiment.id, "b", state="failed", reason="no space")
    states = store.experiments.replicas(experiment.id)
    assert [(r.replica_id, r.state, r.reason) for r in states] == [
        ("a", "serving", ""),
        ("b", "failed", "no space"),
    ]
    assert states[0].updated_at.tzinfo is not None
    with pytest.raises(InvalidExperimentError, match="state must be 1-16"):
        store.experiments.heartbeat(experiment.id, "a", state="x" * 17)
    with pytest.raises(ExperimentNotFoundError):
        store.experiments.heartbeat(experiment.id + 5, "a", state="serving")


def test_one_flush_of_two_thousand_users(store, adapter):
    adapter("bulk")
    experiment = start(store, "bulk")
    users = [user(experiment, f"user{i:05d}", i % 2, requests=1) for i in range(2000)]
    completions = [
        CompletionDelta(f"cmpl-{i}", experiment.id, i % 2, f"user{i:05d}", True, T0)
        for i in range(2000)
    ]
    counters = [CounterDelta(experiment.id, v, requests=1000) for v in (0, 1)]
    began = time.perf_counter()
    store.experiments.record(users=users, counters=counters, completions=completions)
    store.experiments.record(users=users, counters=counters, completions=completions)
    elapsed = time.perf_counter() - began
    print(f"two flushes of 2,000 users + completions: {elapsed:.2f} s")
    assert store.experiments.exposure_counts(experiment.id) == {0: 1000, 1: 1000}
    totals = store.experiments.totals(experiment.id)
    assert totals[0].requests == totals[1].requests == 2000
    with store.experiments.analysis(experiment.id) as tx:
        closed = tx.closed_users(closed_before=T0, limit=5000)
        assert len(closed) == 2000 and {u.requests for u in closed} == {2}
        tx.mark_analysed([u.user_hash for u in closed])
        assert tx.closed_users(closed_before=T0, limit=10) == []
    assert store.experiments.rate("cmpl-1999", 1.0, ttl_seconds=60, now=T0).variant == 1


def test_concurrent_flushes_add_up(store, adapter):
    adapter("many")
    experiment = start(store, "many")
    keys = [f"k{i:03d}" for i in range(60)]

    def flush(seed: int) -> None:
        order = keys[seed % 7 :] + keys[: seed % 7]  # every flush in its own order
        if seed % 2:
            order.reverse()
        store.experiments.record(
            users=[user(experiment, k, 0, requests=1) for k in order],
            counters=[CounterDelta(experiment.id, 0, requests=1)],
            completions=[],
        )

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(flush, range(12)))
    assert store.experiments.totals(experiment.id)[0].requests == 12
    with store.experiments.analysis(experiment.id) as tx:
        assert {u.requests for u in tx.closed_users(closed_before=T0, limit=100)} == {12}
