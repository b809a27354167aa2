"""A/B router benchmark: what routing through an experiment, recording it and deciding it cost.

1. `overhead`: one server (uvicorn in a thread, real HTTP over loopback) on the fake engine and a
   real SQLite registry; requests for `NAME` (an experiment, ramp [50], a random one of 10k users)
   interleaved with requests pinned to `NAME@2`: latency of each, then closed-loop throughput.
2. `recording`: `ExperimentRecorder` at a paced 2,000 req/s and at its maximum rate, flushing to
   the store; the requests stored must equal the requests observed.
3. `decision`: an analysis with 1M users folded in, restored from its persisted state, looked at
   and decided; plus one full analysis pass on SQLite over 100k recorded users.

    .venv/bin/python bench/ab_router.py [--postgres URL] [--only overhead,recording,decision]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import numpy as np
import uvicorn
from prometheus_client import CollectorRegistry
from safetensors.numpy import save_file
from sqlalchemy import func
from sqlmodel import select

from bench._machine import ForeignCpu, machine_info, wait_for_quiet
from bench._report import write_json
from bench.serving import utc_stamp
from registry.experiment_records import (
    CounterDelta,
    ExperimentRecord,
    UserDelta,
    UserOutcome,
    VariantSpec,
)
from registry.experiments import ExperimentStore
from registry.service import Registry
from registry.settings import RegistrySettings
from registry.tables import ExperimentCompletionRow
from server.ab.analysis import Analysis, analyse
from server.ab.assignment import Splitter
from server.ab.config import ExperimentConfig
from server.ab.recorder import ExperimentRecorder, RequestOutcome
from server.adapter_cache import AdapterDiskCache
from server.adapter_loader import AdapterLoader
from server.app import create_app
from server.engine_fake import FakeEngine
from server.metrics import ServerMetrics
from server.registry_resolver import RegistryResolver
from server.targets import LocalAdapters

CLK_TCK = os.sysconf("SC_CLK_TCK")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PARTS = ("overhead", "recording", "decision")
LAYER = "base_model.model.model.layers.0.self_attn"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGETS = {"added_median_ms": 1.0, "throughput_ratio": 0.95, "recording_rate": 2000.0,
           "decision_ms": 10.0}  # fmt: skip


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    a = np.asarray(values) * scale
    return {f"p{q}": round(float(np.percentile(a, q)), 3) for q in (50, 90, 99)}


# --- the registry and the server -------------------------------------------------------------


def write_adapter(folder: Path, *, seed: int, rank: int = 8) -> Path:
    """A small PEFT LoRA folder (q_proj, v_proj); `seed` changes the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": BASE_MODEL}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config, sort_keys=True))
    rng = np.random.default_rng(seed)
    tensors = {}
    for module in ("q_proj", "v_proj"):
        tensors[f"{LAYER}.{module}.lora_A.weight"] = rng.standard_normal((rank, 64), np.float32)
        tensors[f"{LAYER}.{module}.lora_B.weight"] = np.zeros((64, rank), np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def open_registry(work: Path, database_url: str | None) -> Registry:
    url = database_url or f"sqlite:///{work / 'registry.db'}"
    return Registry.open(
        RegistrySettings(home=work / "home", registry=url, artifacts=(work / "art").as_uri())
    )


RUN = secrets.token_hex(3)  # names are unique per run: a --postgres database may hold older runs


def start_experiment(registry: Registry, name: str, work: Path) -> ExperimentRecord:
    """Two versions of NAME-RUN, production on 1, an experiment 1 vs 2 with ramp [50]."""
    name = f"{name}-{RUN}"
    for v in (1, 2):
        folder = write_adapter(
            work / "adapters" / f"{name}-{v}", seed=zlib.crc32(f"{name}@{v}".encode())
        )
        registry.register(name, folder, actor="bench")
    registry.store.promote(name, 1, actor="bench")
    return registry.store.experiments.start(
        name, variants=[VariantSpec(1, 1.0), VariantSpec(2, 1.0)], ramp=[50.0],
        config=ExperimentConfig().to_json(), actor="bench",
    )  # fmt: skip


class Server:
    """The fake engine behind the registry resolver and the app, served by uvicorn in a thread."""

    def __init__(self, registry: Registry, work: Path):
        self.engine = FakeEngine(token_delay=0.0)
        metrics = ServerMetrics(CollectorRegistry())
        cache = AdapterDiskCache(work / "cache", artifacts=registry.artifacts,
                                 max_bytes=10**9, metrics=metrics)  # fmt: skip
        local = LocalAdapters(self.engine, base_name="fake", adapters={}, metrics=metrics)
        loader = AdapterLoader(self.engine, cache, metrics=metrics, max_loaded=8, max_rank=16,
                               first_id=1)  # fmt: skip
        self.resolver = RegistryResolver(registry.store, loader, local=local, metrics=metrics,
                                         max_loras=self.engine.info.max_loras)  # fmt: skip
        app = create_app(engine=self.engine, resolver=self.resolver, metrics=metrics,
                         registry=registry)  # fmt: skip
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                access_log=False)  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self, experiment_id: int, *, timeout: float = 60.0) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started or not self._applied(experiment_id):
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise SystemExit(f"error: the server did not apply experiment {experiment_id}")
            time.sleep(0.1)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def _applied(self, experiment_id: int) -> bool:
        runtime = self.resolver.experiments
        return runtime is not None and any(e.id == experiment_id for e in runtime.router.applied())

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


# --- 1. router overhead ------------------------------------------------------------------------


def body(model: str, user: str | None) -> dict:
    out = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return out | ({"user": user} if user else {})


def latency_rounds(url: str, name: str, *, rounds: int, warmup: int, users: int) -> dict:
    rng = random.Random(0)
    seconds: dict[str, list[float]] = {"experiment": [], "pinned": []}
    routed = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(warmup + rounds):
            pair = ["experiment", "pinned"]
            rng.shuffle(pair)  # neither way always goes first
            for way in pair:
                user = f"user-{rng.randrange(users)}"
                model = name if way == "experiment" else f"{name}@2"
                started = time.perf_counter()
                reply = client.post("/v1/chat/completions", json=body(model, user))
                took = time.perf_counter() - started
                if reply.status_code != 200:
                    raise SystemExit(f"error: {model}: {reply.status_code} {reply.text}")
                if i >= warmup:
                    seconds[way].append(took)
                    routed += way == "experiment" and "x-loraplex-experiment" in reply.headers
    figures = {way: percentiles(s) for way, s in seconds.items()}
    figures["added_ms"] = {
        q: round(figures["experiment"][q] - figures["pinned"][q], 3) for q in ("p50", "p90", "p99")
    }
    figures["routed_through_experiment"] = routed
    figures["requests_each"] = rounds
    return figures


async def closed_loop(url: str, model: str, *, requests: int, concurrency: int) -> float:
    """Requests per second with `concurrency` in flight."""
    rng = random.Random(1)
    left = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for _ in left:
                reply = await client.post(
                    "/v1/chat/completions", json=body(model, f"user-{rng.randrange(10_000)}")
                )
                if reply.status_code != 200:
                    raise SystemExit(f"error: {model}: {reply.status_code} {reply.text}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - started)


def server_cpu_seconds() -> float:
    """CPU seconds of every thread of this process but the main one (where the client runs):
    the server's event loop and its worker threads (flushes, analysis passes)."""
    main, total = threading.main_thread().native_id, 0
    for task in Path("/proc/self/task").iterdir():
        if int(task.name) == main:
            continue
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def throughput_rounds(url: str, name: str, *, repeats: int, requests: int, concurrency: int):
    rates: dict[str, list[float]] = {"experiment": [], "pinned": []}
    cpu: dict[str, list[float]] = {"experiment": [], "pinned": []}
    asyncio.run(closed_loop(url, name, requests=requests // 4, concurrency=concurrency))  # warm
    for i in range(repeats):
        order = ["experiment", "pinned"] if i % 2 == 0 else ["pinned", "experiment"]
        for way in order:
            model = name if way == "experiment" else f"{name}@2"
            before = server_cpu_seconds()
            rate = asyncio.run(closed_loop(url, model, requests=requests, concurrency=concurrency))
            cpu[way].append(round((server_cpu_seconds() - before) / requests * 1000, 3))
            rates[way].append(round(rate, 1))
    medians = {way: statistics.median(r) for way, r in rates.items()}
    return {
        "requests_per_second": rates,
        "median_requests_per_second": medians,
        "server_cpu_ms_per_request": cpu,
        "median_server_cpu_ms_per_request": {w: statistics.median(c) for w, c in cpu.items()},
        "ratio": round(medians["experiment"] / medians["pinned"], 4),
        "requests": requests,
        "concurrency": concurrency,
    }


def run_overhead(work: Path, args: argparse.Namespace) -> dict:
    registry = open_registry(work / "overhead", None)
    experiment = start_experiment(registry, "support", work / "overhead")
    server = Server(registry, work / "overhead")
    try:
        url = server.start(experiment.id)
        latency = latency_rounds(url, experiment.name, rounds=args.rounds, warmup=200, users=10_000)
        throughput = throughput_rounds(url, experiment.name, repeats=args.repeats,
                                       requests=args.requests, concurrency=args.concurrency)  # fmt: skip
    finally:
        server.stop()
        registry.close()
    return {"latency_ms": latency, "throughput": throughput}


# --- 2. recording ------------------------------------------------------------------------------


class TimedStore:
    """The experiment store, with each `record` call timed in its worker thread: wall and CPU
    seconds of that thread (CPU time holds up on a busy machine; wall time does not)."""

    def __init__(self, store: ExperimentStore):
        self._store = store
        self.writes: list[tuple[float, float, int]] = []  # (wall s, cpu s, requests)

    def record(self, **deltas) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        self._store.record(**deltas)
        requests = sum(c.requests for c in deltas["counters"])
        self.writes.append((time.perf_counter() - wall, time.thread_time() - cpu, requests))

    def __getattr__(self, name: str):
        return getattr(self._store, name)


async def drain_and_close(recorder: ExperimentRecorder) -> None:
    """`close()`, but never while a flush is in flight: cancelling the flush task mid-write puts
    the batch back although its transaction still commits, and close() writes it again (the
    additive counters then count those requests twice). Holding the flush lock, the task can be
    cancelled only while it sleeps or waits for the lock."""
    lock, task = getattr(recorder, "_flush_lock", None), getattr(recorder, "_task", None)
    if lock is not None and task is not None:
        async with lock:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await recorder.close()


async def record_for(registry: Registry, experiment: ExperimentRecord, *,
                     rate: float | None, seconds: float, users: int) -> dict:  # fmt: skip
    """Observe requests at `rate` per second (None: as fast as the loop goes) for `seconds`."""
    store = TimedStore(registry.store.experiments)
    recorder = ExperimentRecorder(store, ServerMetrics(CollectorRegistry()), flush_seconds=1.0)  # type: ignore[arg-type]
    splitter = Splitter(experiment)
    assignments = [splitter.assign(f"user-{i}") for i in range(users)]
    rng = random.Random(2)
    recorder.start()
    sent, observe_cpu = 0, 0.0
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate) if rate else sent + 200
        cpu = time.thread_time()
        while sent < due:
            outcome = RequestOutcome(f"cmpl-{experiment.id}-{sent}", 500 if sent % 97 == 0 else 200,
                                     0.01, 0.005, 1)  # fmt: skip
            recorder.observe(experiment, assignments[rng.randrange(users)], outcome)
            sent += 1
        observe_cpu += time.thread_time() - cpu
        await asyncio.sleep(0.001 if rate else 0)
    observed_seconds = time.monotonic() - started
    await drain_and_close(recorder)
    totals = store.totals(experiment.id)
    with registry.store.read() as session:  # no API counts completions; read the table
        completions = session.exec(
            select(func.count()).where(ExperimentCompletionRow.experiment_id == experiment.id)
        ).one()
    stored = sum(t.requests for t in totals.values())
    walls, cpus = [w for w, _, _ in store.writes], [c for _, c, _ in store.writes]
    return {
        "target_rate": rate,
        "observed": sent,
        "achieved_rate": round(sent / observed_seconds, 1),
        "observe_cpu_us": round(observe_cpu / max(sent, 1) * 1e6, 2),
        "stored_requests": stored,
        "stored_completions": completions,
        "users_stored": sum(t.users for t in totals.values()),
        "loss": sent - stored,
        "completion_loss": sent - completions,
        "flushes": len(walls),
        "flush_ms": percentiles(walls),
        "flush_cpu_ms": percentiles(cpus),
        "write_busy_share": round(sum(walls) / observed_seconds, 3),
        "write_rate": round(sent / max(sum(walls), 1e-9), 1),  # requests per second of writing
        "write_cpu_us_per_request": round(sum(cpus) / max(sent, 1) * 1e6, 2),
        "largest_flush_requests": max((n for _, _, n in store.writes), default=0),
    }


def run_recording(work: Path, args: argparse.Namespace, database_url: str | None) -> dict:
    registry = open_registry(work, database_url)
    try:
        out = {}
        for label, rate in (("paced", 2000.0), ("max_rate", None)):
            experiment = start_experiment(registry, f"rec-{label.replace('_', '-')}", work)
            out[label] = asyncio.run(record_for(registry, experiment, rate=rate,
                                                seconds=args.record_seconds, users=10_000))  # fmt: skip
        return out
    finally:
        registry.close()


# --- 3. decision ------------------------------------------------------------------------------


def outcomes(rng: np.random.Generator, start: int, count: int, at: datetime) -> list[UserOutcome]:
    variant = rng.integers(0, 2, count)
    requests = rng.integers(1, 20, count)
    errors = rng.binomial(requests, 0.01)
    slow = rng.binomial(requests, 0.02)
    rated = rng.integers(0, 3, count)
    score = rng.random(count) * rated
    return [
        UserOutcome(
            f"{start + i:032x}",
            int(variant[i]),
            at,
            int(requests[i]),
            int(errors[i]),
            int(slow[i]),
            int(requests[i]),
            float(score[i]),
            int(rated[i]),
            at if errors[i] else None,
        )  # fmt: skip
        for i in range(count)
    ]


def decision_cost(experiment: ExperimentRecord, *, users: int, runs: int) -> dict:
    config = ExperimentConfig(**experiment.config)
    analysis = Analysis(experiment, config)
    rng = np.random.default_rng(3)
    at = datetime.now(UTC) - timedelta(hours=2)
    fold_seconds, exposures = 0.0, [0, 0]
    for start in range(0, users, 200_000):  # the pass's batch size
        batch = outcomes(rng, start, min(200_000, users - start), at)
        for u in batch:
            exposures[u.variant] += 1
        t0 = time.perf_counter()
        analysis.add_users(batch)
        analysis.add_first_errors([u for u in batch if u.first_error_at is not None])
        fold_seconds += time.perf_counter() - t0
    analysis.look_at_ratio({0: exposures[0], 1: exposures[1]})
    state = json.loads(json.dumps(analysis.to_state()))  # as the database returns it
    persisted = dataclasses.replace(experiment, analysis=state)
    later = {0: exposures[0] + 50, 1: exposures[1] + 50}
    now = datetime.now(UTC)
    took, action = [], ""
    for _ in range(runs):
        t0 = time.perf_counter()
        again = Analysis(persisted, config)
        again.look_at_ratio(later)
        action = again.decide(now).action
        again.statistics()
        took.append(time.perf_counter() - t0)
    return {
        "users": users,
        "fold_seconds": round(fold_seconds, 3),
        "fold_us_per_user": round(fold_seconds / users * 1e6, 3),
        "state_json_bytes": len(json.dumps(state)),
        "decide_ms": percentiles(took),
        "runs": runs,
        "decision": action,
    }


def analysis_pass(registry: Registry, experiment: ExperimentRecord, *, users: int) -> dict:
    """`users` user rows written by store.record (flush-sized batches), then analyse() twice."""
    store = registry.store.experiments
    rng = np.random.default_rng(4)
    at = datetime.now(UTC) - timedelta(hours=2)
    t0 = time.perf_counter()
    for start in range(0, users, 5_000):
        batch = outcomes(rng, start, min(5_000, users - start), at)
        deltas = [UserDelta(experiment.id, u.user_hash, u.variant, u.first_seen_at, u.requests,
                            u.errors, u.slow, u.output_tokens, u.first_error_at) for u in batch]  # fmt: skip
        counters = [CounterDelta(experiment.id, v, requests=sum(u.requests for u in batch
                                                                if u.variant == v)) for v in (0, 1)]  # fmt: skip
        store.record(users=deltas, counters=counters, completions=[])
    insert_seconds = time.perf_counter() - t0
    passes = []
    for _ in range(2):
        t0 = time.perf_counter()
        result = analyse(store, experiment.id)
        passes.append(time.perf_counter() - t0)
    if result is None:
        raise SystemExit("error: the analysis pass found the experiment not running")
    comparison = result.statistics["comparisons"]["1"]
    return {
        "users": users,
        "insert_seconds": round(insert_seconds, 2),
        "first_pass_seconds": round(passes[0], 3),
        "second_pass_ms": round(passes[1] * 1000, 1),
        "users_folded": comparison["users"]["control"] + comparison["users"]["candidate"],
        "decision": result.decision.action,
    }


def run_decision(work: Path, args: argparse.Namespace, database_url: str | None) -> dict:
    registry = open_registry(work, database_url)
    try:
        cost = decision_cost(start_experiment(registry, "decide-1m", work),
                             users=args.decision_users, runs=50)  # fmt: skip
        full = analysis_pass(registry, start_experiment(registry, "decide-pass", work),
                             users=args.pass_users)  # fmt: skip
        return {"from_state": cost, "analysis_pass": full}
    finally:
        registry.close()


# --- report ---------------------------------------------------------------------------------


def verdicts(results: dict) -> dict[str, bool]:
    met: dict[str, bool] = {}
    if o := results.get("overhead"):
        met["added_median_latency_le_1ms"] = o["latency_ms"]["added_ms"]["p50"] <= 1.0
        met["throughput_ratio_ge_0.95"] = o["throughput"]["ratio"] >= 0.95
    for backend, r in results.get("recording", {}).items():
        met[f"recording_{backend}_2000_per_s_no_loss"] = (
            r["paced"]["achieved_rate"] >= 0.98 * TARGETS["recording_rate"]
            and all(run["loss"] == 0 and run["completion_loss"] == 0 for run in r.values())
        )  # fmt: skip
    for backend, r in results.get("decision", {}).items():
        met[f"decision_{backend}_lt_10ms"] = r["from_state"]["decide_ms"]["p50"] < 10.0
    return met


def table(results: dict) -> str:
    lines = []
    if o := results.get("overhead"):
        lat, thr = o["latency_ms"], o["throughput"]
        cpu = thr["median_server_cpu_ms_per_request"]
        lines += ["| way | p50 ms | p90 ms | p99 ms | req/s | server CPU ms/req |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for way in ("experiment", "pinned"):
            lines.append(f"| {way} | {lat[way]['p50']} | {lat[way]['p90']} | {lat[way]['p99']} "
                         f"| {thr['median_requests_per_second'][way]} | {cpu[way]} |")  # fmt: skip
        added = lat["added_ms"]
        lines.append(f"| added | {added['p50']:+} | {added['p90']:+} | {added['p99']:+} "
                     f"| x{thr['ratio']} | {cpu['experiment'] - cpu['pinned']:+.3f} |")  # fmt: skip
    if recording := results.get("recording"):
        lines += ["", "| store | run | req/s | stored / observed | flush p50 / p99 ms "
                  "| write CPU us/req | observe CPU us |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for backend, r in recording.items():
            for label, x in r.items():
                lines.append(f"| {backend} | {label} | {x['achieved_rate']} | {x['stored_requests']}"
                             f" / {x['observed']} | {x['flush_ms']['p50']} / {x['flush_ms']['p99']}"
                             f" | {x['write_cpu_us_per_request']} | {x['observe_cpu_us']} |")  # fmt: skip
    if decision := results.get("decision"):
        lines += ["", "| store | users | decide p50 / p99 ms | fold s | analyse() users | first pass s "
                  "| next pass ms |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for backend, r in decision.items():
            c, p = r["from_state"], r["analysis_pass"]
            lines.append(f"| {backend} | {c['users']:,} | {c['decide_ms']['p50']} / "
                         f"{c['decide_ms']['p99']} | {c['fold_seconds']} | {p['users']:,} "
                         f"| {p['first_pass_seconds']} | {p['second_pass_ms']} |")  # fmt: skip
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default=",".join(PARTS), help="parts to run: " + ",".join(PARTS))
    p.add_argument("--rounds", type=int, default=3000, help="latency requests per way")
    p.add_argument("--requests", type=int, default=600, help="requests per throughput run")
    p.add_argument("--repeats", type=int, default=6, help="throughput runs per way")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--record-seconds", type=float, default=10.0)
    p.add_argument("--decision-users", type=int, default=1_000_000)
    p.add_argument("--pass-users", type=int, default=100_000)
    p.add_argument("--postgres", default=None, help="also record and decide on this database URL")
    p.add_argument(
        "--busy-threshold", type=float, default=0.5,
        help="before each part, wait until other processes use fewer CPU cores than this",
    )  # fmt: skip
    p.add_argument("--max-wait", type=float, default=20.0, help="seconds to wait at most")
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parts = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := sorted(set(parts) - set(PARTS)):
        raise SystemExit(f"error: unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    started = utc_stamp()
    out = args.out or RESULTS_DIR / f"ab_router-{started}.json"
    backends = {"sqlite": None} | ({"postgresql": args.postgres} if args.postgres else {})
    results: dict = {}
    load: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="loraplex-ab-bench-") as tmp:
        work = Path(tmp)
        for part in parts:
            wait_for_quiet(threshold_cores=args.busy_threshold, max_wait_seconds=args.max_wait)
            meter, began = ForeignCpu(), time.monotonic()
            meter.start()
            if part == "overhead":
                results[part] = run_overhead(work, args)
            else:
                run = run_recording if part == "recording" else run_decision
                results[part] = {b: run(work / f"{part}-{b}", args, u) for b, u in backends.items()}
            load[part] = dataclasses.asdict(meter.stop())
            load[part]["seconds"] = round(time.monotonic() - began, 1)
    document = {
        "benchmark": "ab_router",
        "started_utc": started,
        "finished_utc": utc_stamp(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "engine": "FakeEngine(token_delay=0)",
            "ramp": [50.0],
            "users": 10_000,
            "max_tokens": 1,
            "flush_seconds": 1.0,
            "analysis_seconds": 5.0,
            "targets": TARGETS,
        },  # fmt: skip
        "results": results,
        "machine_load": load,
        "targets_met": verdicts(results),
    }
    if args.postgres:
        document["settings"]["postgres"] = "given (URL not recorded)"
    write_json(out, document)
    print(table(results))
    print(f"other processes' CPU cores per part: "
          f"{ {p: v['foreign_cpu_cores'] for p, v in load.items()} }")  # fmt: skip
    print(f"targets: {document['targets_met']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
