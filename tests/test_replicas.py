"""Several replicas act as one: two `loraplex serve` processes (real vLLM CPU engines) on one
PostgreSQL database and one S3 API (moto's server), driven through the official `openai` client
and the admin API of either replica.

A promotion or rollback through one is served by both; a user gets the same variant on both;
feedback given through one shows in the status read through the other; an automatic decision is
taken once, by one of the two or by the survivor alone; and a replica killed mid-load loses no registry or experiment state while the other
keeps serving (the status then marks the silent one, once it is past its reports). The replicas
start once for the module (~1-2 min on 2 cores); the kill test runs last of them.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import boto3
import httpx
import openai
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from loraplex.cli import app
from registry.experiment_records import VariantSpec
from registry.service import Registry
from registry.settings import RegistrySettings
from server.ab.operations import STALE_REPLICA_SECONDS, status
from tests.registry.conftest import write_adapter
from tests.support.adapters import ADAPTER_SPECS, build_test_adapters
from tests.support.replicas import LORAPLEX, Replica, postgres_database, replica_pair
from tests.support.servers import wait_for

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
ROLLING, SPLIT, AUTO, SOLO = "rolling", "split", "auto", "solo"  # one adapter name per concern


class Deployment:
    """Both replicas, the registry they share (opened here too), and how to reach it."""

    def __init__(self, replicas: list[Replica], registry: Registry, database_url: str):
        self.a, self.b = replicas
        self.replicas = replicas
        self.registry = registry
        self.database_url = database_url

    @property
    def experiments(self):
        return self.registry.store.experiments


@pytest.fixture(scope="module")
def deployment(request, tmp_path_factory, embedded_model_dir) -> Iterator[Deployment]:
    postgres = request.getfixturevalue("postgres_server")
    endpoint = request.getfixturevalue("s3_endpoint")
    root = tmp_path_factory.mktemp("replicas")
    specs = {name: ADAPTER_SPECS[name] for name in ("caps", "prefix")}
    from tests.conftest import test_cache_root

    adapters = build_test_adapters(embedded_model_dir, test_cache_root() / "adapters", specs=specs)
    s3 = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    bucket = f"loraplex-replicas-{root.name[-8:].lower()}"
    with pytest.MonkeyPatch.context() as patch, postgres_database(postgres) as url:
        for key, value in s3.items():
            patch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket=bucket)
        artifacts = f"s3://{bucket}/adapters"
        settings = RegistrySettings(home=root / "tester", registry=url, artifacts=artifacts)
        with Registry.open(settings) as registry:
            for name in (ROLLING, SPLIT, AUTO, SOLO):
                registry.register(name, adapters["caps"], actor="setup")
                registry.register(name, adapters["prefix"], actor="setup")
                registry.store.promote(name, 1, actor="setup", reason="first release")
            started = time.monotonic()
            with replica_pair(
                root, model_dir=embedded_model_dir, database_url=url, artifacts_url=artifacts,
                s3=s3,
            ) as replicas:  # fmt: skip
                print(f"two replicas ready in {time.monotonic() - started:.1f} s")
                yield Deployment(replicas, registry, url)


def ask(replica: Replica, model: str, user: str | None = None) -> tuple[str, str | None, str]:
    """(model that answered, x-loraplex-variant, completion id): a one-token chat completion."""
    extra = {"user": user} if user is not None else {}
    raw = replica.client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1, **extra
    )
    reply = raw.parse()
    return reply.model, raw.headers.get("x-loraplex-variant"), reply.id


def served_everywhere(replicas: list[Replica], model: str, expected: str) -> dict[str, float]:
    """Poll every replica (each in its own thread, so one's latency does not delay the other's
    probe) until `model` answers as `expected`; the seconds each one took."""
    started = time.monotonic()
    lags: dict[str, float] = {}
    errors: list[BaseException] = []

    def probe(replica: Replica) -> None:
        try:
            while ask(replica, model)[0] != expected:
                if time.monotonic() - started > 60:
                    raise AssertionError(f"{replica.name} not serving {expected} after 60 s")
                time.sleep(0.02)
            lags[replica.name] = time.monotonic() - started
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=probe, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert errors == [] and len(lags) == len(replicas), (errors, lags)
    return lags


def start_experiment(replica: Replica, name: str, **body) -> dict:
    response = replica.admin("POST", "/experiments", json={"name": name, **body})
    assert response.status_code == 201, response.text
    return response.json()


def applied_everywhere(replicas: list[Replica], name: str, experiment_id: int) -> None:
    def applied() -> bool:
        for replica in replicas:
            raw = replica.client.chat.completions.with_raw_response.create(
                model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                user="probe",
            )  # fmt: skip
            if raw.headers.get("x-loraplex-experiment") != str(experiment_id):
                return False
        return True

    wait_for(applied, timeout=60, every=0.2)


@pytest.mark.engine
@pytest.mark.postgres
def test_a_promotion_and_a_rollback_through_one_replica_are_served_by_both(deployment):
    assert {r.name: ask(r, ROLLING)[0] for r in deployment.replicas} == {
        "a": f"{ROLLING}@1", "b": f"{ROLLING}@1",
    }  # fmt: skip
    promoted = deployment.a.admin("POST", f"/adapters/{ROLLING}/promote", json={"version": 2})
    assert promoted.status_code == 200, promoted.text
    lags = served_everywhere(deployment.replicas, ROLLING, f"{ROLLING}@2")
    print(f"promote through a: served by a after {lags['a']:.2f} s, by b after {lags['b']:.2f} s")

    rolled = deployment.b.admin("POST", f"/adapters/{ROLLING}/rollback", json={})
    assert rolled.status_code == 200, rolled.text
    assert (rolled.json()["from"], rolled.json()["to"]) == (2, 1)
    lags = served_everywhere(deployment.replicas, ROLLING, f"{ROLLING}@1")
    print(f"rollback through b: served by a after {lags['a']:.2f} s, by b after {lags['b']:.2f} s")
    history = deployment.registry.store.history(ROLLING)
    assert [(m.kind, m.to_version, m.actor) for m in history[-2:]] == [
        ("promote", 2, "a"), ("rollback", 1, "b"),
    ]  # fmt: skip


@pytest.mark.engine
@pytest.mark.postgres
def test_a_user_gets_the_same_variant_on_both_replicas(deployment):
    started = start_experiment(deployment.a, SPLIT, variants={"1": 1.0, "2": 1.0})
    applied_everywhere(deployment.replicas, SPLIT, started["id"])
    users = [f"user-{i}" for i in range(40)]
    on_a = {u: ask(deployment.a, SPLIT, u)[:2] for u in users}
    on_b = {u: ask(deployment.b, SPLIT, u)[:2] for u in users}
    assert on_a == on_b
    assert Counter(v for _, v in on_a.values()).keys() == {"0", "1"}
    assert all(model == f"{SPLIT}@{int(v) + 1}" for model, v in on_a.values())


@pytest.mark.engine
@pytest.mark.postgres
def test_feedback_through_one_replica_counts_in_the_status_read_from_the_other(deployment):
    experiment = deployment.experiments.running(SPLIT)
    assert experiment is not None, "runs after the stickiness test, on its experiment"

    def feedback() -> dict[str, tuple[int, float]]:
        status = deployment.b.admin("GET", f"/experiments/{SPLIT}")
        assert status.status_code == 200, status.text
        return {str(v["index"]): (v["feedback"], v["mean_feedback"] or 0.0)
                for v in status.json()["variants"]}  # fmt: skip

    before = feedback()
    given: dict[str, list[float]] = {"0": [], "1": []}
    for i in range(12):
        _, variant, completion = ask(deployment.a, SPLIT, f"rater-{i}")
        score = (i % 4) / 4
        rated = httpx.post(
            f"{deployment.a.url}/v1/feedback", json={"completion_id": completion, "score": score}
        )
        assert rated.status_code == 200, rated.text
        given[variant].append(score)

    def expected() -> dict[str, tuple[int, float]]:
        out = {}
        for variant, (count, mean) in before.items():
            total = count + len(given[variant])
            out[variant] = (total, (count * mean + sum(given[variant])) / total if total else 0.0)
        return out

    wait_for(lambda: _close(feedback(), expected()), timeout=30)
    cli = subprocess.run(
        [LORAPLEX, "ab", "status", SPLIT, "--json", "--registry", deployment.database_url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    by_cli = {str(v["index"]): v["feedback"] for v in json.loads(cli.stdout)["variants"]}
    assert by_cli == {v: count for v, (count, _) in expected().items()}


def _close(got: dict[str, tuple[int, float]], want: dict[str, tuple[int, float]]) -> bool:
    return got.keys() == want.keys() and all(
        got[k][0] == want[k][0] and abs(got[k][1] - want[k][1]) < 1e-9 for k in got
    )


def decide_automatically(deployment: Deployment, name: str, replicas: list[Replica]) -> int:
    """Start an `--auto` experiment on NAME through the first of `replicas` and send traffic
    through them until it decides: the candidate always pleases, the control never. Checks the
    decision happened once; returns the experiment id."""
    config = {"auto": True, "window_seconds": 0.5, "dwell_seconds": 0, "final_dwell_seconds": 0,
              "min_users_per_arm": 15, "guardrails": {}}  # fmt: skip
    started = start_experiment(
        replicas[0], name, control=1, candidate=2, ramp=[50.0], config=config
    )
    experiment_id = started["id"]
    applied_everywhere(replicas, name, experiment_id)
    sent = 0

    def decided() -> bool:
        nonlocal sent
        for _ in range(6):
            sent += 1
            served_by = replicas[sent % len(replicas)]
            model, _, completion = ask(served_by, name, f"sim-{sent}")
            rater = replicas[(sent // 2) % len(replicas)]  # often not the one that served
            score = 1.0 if model == f"{name}@2" else 0.0
            httpx.post(
                f"{rater.url}/v1/feedback", json={"completion_id": completion, "score": score}
            )
        return not deployment.experiments.get(experiment_id).running

    wait_for(decided, timeout=240, every=0)
    print(f"{name}: automatic promotion after {sent} requests through {len(replicas)} replica(s)")
    assert deployment.experiments.get(experiment_id).status == "promoted"
    ends = [e for e in deployment.experiments.events(experiment_id) if e.kind == "end"]
    assert len(ends) == 1
    time.sleep(2.5)  # two more analysis passes on each replica: nothing more may happen
    history = deployment.registry.store.history(name)
    moves = [m for m in history if m.details and m.details.get("experiment") == experiment_id]
    assert [(m.kind, m.to_version) for m in moves] == [("promote", 2)]
    assert len(history) == 2  # setup's promotion, then this one
    served_everywhere(replicas, name, f"{name}@2")
    return experiment_id


@pytest.mark.engine
@pytest.mark.postgres
def test_an_automatic_decision_is_taken_exactly_once(deployment):
    experiment_id = decide_automatically(deployment, AUTO, [deployment.b, deployment.a])
    actions = {
        r.name: r.metric("loraplex_ab_actions_total", {"experiment": str(experiment_id)})
        for r in deployment.replicas
    }
    assert sorted(actions.values()) == [0, 1], actions  # one acted, the other did nothing


def _slice_matches_counters(deployment: Deployment, experiment_id: int) -> None:
    """Every flush wrote users and counters together: per variant, the analysed slice's request
    count is the counters' keyed, in-slice share (no half-written flush)."""
    with deployment.registry.store.engine.connect() as conn:
        users = dict(conn.execute(text(
            "SELECT variant, sum(requests) FROM experiment_users WHERE experiment_id = :e"
            " GROUP BY variant"), {"e": experiment_id}).all())  # fmt: skip
        counters = dict(conn.execute(text(
            "SELECT variant, requests - unkeyed_requests - unanalysed_requests"
            " FROM experiment_counters WHERE experiment_id = :e"), {"e": experiment_id}).all())  # fmt: skip
    assert users == counters


@pytest.mark.engine
@pytest.mark.postgres
def test_killing_one_replica_mid_load_loses_no_state_and_the_other_keeps_serving(deployment):
    store = deployment.experiments
    experiment = store.running(SPLIT)
    assert experiment is not None
    routing_before = deployment.registry.store.routing_snapshot().aliases
    history_before = {n: len(deployment.registry.store.history(n)) for n in (ROLLING, SPLIT, AUTO)}
    recorded_before = sum(t.requests for t in store.totals(experiment.id).values())
    a_before = deployment.a.metric("loraplex_ab_requests_total", {"experiment": str(experiment.id)})
    _slice_matches_counters(deployment, experiment.id)

    def recorded() -> int:
        return sum(t.requests for t in store.totals(experiment.id).values()) - recorded_before

    stop = threading.Event()
    outcomes: dict[str, list[tuple[float, bool]]] = {"a": [], "b": []}
    sticky: dict[str, str] = {}
    problems: list[str] = []
    # First b alone, until its requests are in the database: what it wrote must survive it.
    for i in range(10):
        user = f"load-{i}"
        sticky[user] = ask(deployment.b, SPLIT, user)[1]
    wait_for(lambda: recorded() == 10, timeout=30)

    def load(replica: Replica, seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            user = f"load-{rng.randrange(30)}"
            try:
                model, variant, _ = ask(replica, SPLIT, user)
            except (openai.APIError, httpx.HTTPError) as e:
                outcomes[replica.name].append((time.monotonic(), False))
                if replica.name == "a":
                    problems.append(f"a failed: {e!r}")
                else:
                    time.sleep(0.05)
                continue
            outcomes[replica.name].append((time.monotonic(), True))
            if sticky.setdefault(user, variant) != variant:
                problems.append(f"{user} moved from variant {sticky[user]} to {variant}")

    threads = [threading.Thread(target=load, args=(r, i)) for i, r in
               enumerate(deployment.replicas * 2)]  # fmt: skip
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: all(sum(ok for _, ok in outcomes[n]) >= 10 for n in "ab"), timeout=120)
        killed_at = time.monotonic()
        deployment.b.kill()
        wait_for(lambda: sum(ok for t, ok in outcomes["a"] if t > killed_at + 1) >= 20, timeout=120)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert problems == []
    a_ok = sum(ok for _, ok in outcomes["a"])
    b_ok = sum(ok for _, ok in outcomes["b"])
    b_after = sum(ok for t, ok in outcomes["b"] if t > killed_at + 1)
    print(f"load: a served {a_ok} (0 failed), b served {b_ok} before SIGKILL, {b_after} after")
    assert b_after == 0 and any(not ok for _, ok in outcomes["b"])
    # The survivor counted and flushed every request it served.
    a_now = deployment.a.metric("loraplex_ab_requests_total", {"experiment": str(experiment.id)})
    assert a_now - a_before == a_ok
    wait_for(lambda: recorded() >= 10 + a_ok, timeout=30)
    time.sleep(1.5)  # one more flush period: nothing else may arrive
    # b's first 10 and everything a served, plus what b flushed of the rest before it died: a
    # SIGKILL loses at most the flush period b had not written yet.
    assert 10 + a_ok <= recorded() <= 10 + a_ok + b_ok
    lost = 10 + a_ok + b_ok - recorded()
    print(f"recorded {recorded()} of {10 + a_ok + b_ok} served ({lost} lost with b)")
    _slice_matches_counters(deployment, experiment.id)
    # The registry is as it was, the survivor still analyses, and the killed replica left no lock.
    assert deployment.registry.store.routing_snapshot().aliases == routing_before
    assert {n: len(deployment.registry.store.history(n)) for n in history_before} == history_before
    analysed = store.get(experiment.id).analysed_at

    def analysed_again() -> bool:
        now = store.get(experiment.id).analysed_at
        return now is not None and (analysed is None or now > analysed)

    wait_for(analysed_again, timeout=30)
    assert httpx.get(f"{deployment.a.url}/ready").status_code == 200
    promoted = deployment.a.admin("POST", f"/adapters/{ROLLING}/promote", json={"version": 2})
    assert promoted.status_code == 200, promoted.text
    wait_for(lambda: ask(deployment.a, ROLLING)[0] == f"{ROLLING}@2", timeout=30)


@pytest.mark.engine
@pytest.mark.postgres
def test_with_one_replica_left_the_survivor_alone_takes_the_decision_once(deployment):
    deployment.b.kill()  # already killed by the test above when the module runs in order
    experiment_id = decide_automatically(deployment, SOLO, [deployment.a])
    actions = deployment.a.metric("loraplex_ab_actions_total", {"experiment": str(experiment_id)})
    assert actions == 1


@pytest.mark.engine
@pytest.mark.postgres
def test_a_killed_replica_leaves_no_engine_process_behind(deployment):
    deployment.b.kill()  # already killed by the test above when the module runs in order
    try:
        wait_for(lambda: not deployment.b.leftovers(), timeout=20)
    finally:
        left = [f"{p.pid} {p.name()}" for p in deployment.b.leftovers()]
        print(f"left behind by the killed replica: {left}")
        deployment.b.reap()


def test_a_replica_silent_past_its_reports_is_marked_presumed_gone(tmp_path):
    """What the status shows of a replica killed without a goodbye: its last state, marked."""
    settings = RegistrySettings(
        home=tmp_path / "home",
        registry=f"sqlite:///{tmp_path / 'registry.db'}",
        artifacts=(tmp_path / "artifacts").as_uri(),
    )
    with Registry.open(settings) as registry:
        for seed in (1, 2):
            registry.register("gone", write_adapter(tmp_path / f"v{seed}", seed=seed), actor="t")
        registry.store.promote("gone", 1, actor="t")
        store = registry.store.experiments
        experiment = store.start(
            "gone", variants=[VariantSpec(1, 1.0), VariantSpec(2, 1.0)], ramp=None, config={},
            actor="t",
        )  # fmt: skip
        for replica in ("replica-live", "replica-killed"):
            store.heartbeat(experiment.id, replica, state="applied")
        with registry.store.engine.begin() as conn:
            conn.execute(
                text("UPDATE experiment_replicas SET updated_at = :at WHERE replica_id = :r"),
                {"at": datetime.now(UTC) - timedelta(seconds=STALE_REPLICA_SECONDS + 5),
                 "r": "replica-killed"},
            )  # fmt: skip
        replicas = {r["replica_id"]: r for r in status(store, "gone")["replicas"]}
    assert {r: (v["state"], v["stale"]) for r, v in replicas.items()} == {
        "replica-live": ("applied", False), "replica-killed": ("applied", True),
    }  # fmt: skip
    assert replicas["replica-killed"]["reported_seconds_ago"] > STALE_REPLICA_SECONDS
    shown = CliRunner().invoke(app, ["ab", "status", "gone", "--registry", settings.registry])
    assert shown.exit_code == 0, shown.output
    lines = [line for line in shown.stdout.splitlines() if line.startswith("replica ")]
    assert lines[0].startswith("replica replica-killed: applied (silent for ")
    assert lines[0].endswith(" s: presumed gone)")
    assert lines[1] == "replica replica-live: applied"
