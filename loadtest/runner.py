"""Drive one load test: open loop (arrival schedule) or closed loop (fixed concurrency).

Owns the run's lifecycle: bounds (`requests`, `duration`), in-flight bookkeeping, live counters
for a progress display, and a clean stop (the `stop` event, e.g. set on Ctrl-C) that cancels what
is in flight and still returns every record for a partial report. Statistics are not computed here.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.arrivals import ArrivalProcess
from loadtest.client import CANCELLED, OpenAIHTTPClient, RequestRecord
from loadtest.workload import (
    CHAT,
    PROMPT_ORDERS,
    AdapterMix,
    LengthDist,
    RequestSpec,
    Workload,
    load_prompts,
    synthetic_prompts,
)

DEFAULT_POOL = 1024  # open loop without a concurrency cap: connections kept at most


@dataclass(frozen=True)
class LoadSettings:
    """One load test, as the CLI or a caller describes it."""

    url: str
    models: tuple[str, ...]
    mix: str = "uniform"
    rate: float | None = None  # requests/s, open loop; None with `concurrency` = closed loop
    arrival: str = "poisson"
    burstiness: float = 1.0
    concurrency: int | None = None  # closed loop; with `rate` it caps what is in flight
    requests: int | None = None
    duration: float | None = None
    warmup: float = 0.0
    cooldown: float = 0.0
    prompts: Path | None = None
    prompt_order: str = "random"  # or "sequential": the prompts in order, cycled
    input_len: str = "64"
    output_len: str = "128"
    endpoint: str = CHAT  # for synthetic prompts
    ignore_eos: bool = False
    users: int = 0
    seed: int = 0
    stream: bool = True
    timeout: float = 600.0
    api_key: str | None = None
    slos: tuple[tuple[str, float], ...] = ()  # (metric, seconds)

    def __post_init__(self) -> None:
        problems = []
        if self.rate is None and self.concurrency is None:
            problems.append("give --rate (open loop) or --concurrency (closed loop)")
        if self.concurrency is not None and self.concurrency < 1:
            problems.append(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and math.isinf(self.rate) and self.requests is None:
            problems.append("--rate inf sends everything at once: give --requests")
        if self.requests is None and self.duration is None:
            problems.append("give --requests and/or --duration to bound the run")
        if self.requests is not None and self.requests < 1:
            problems.append(f"--requests must be >= 1, got {self.requests}")
        if self.duration is not None and not self.duration > 0:
            problems.append(f"--duration must be > 0 seconds, got {self.duration}")
        if self.warmup < 0 or self.cooldown < 0:
            problems.append("--warmup and --cooldown must be >= 0 seconds")
        if self.users < 0:
            problems.append(f"--users must be >= 0, got {self.users}")
        if self.prompt_order not in PROMPT_ORDERS:
            problems.append(
                f"--prompt-order must be {' or '.join(PROMPT_ORDERS)}, got {self.prompt_order!r}"
            )
        if problems:
            raise ValueError("; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["prompts"] = str(self.prompts) if self.prompts else None
        out["api_key"] = "***" if self.api_key else None
        out["slos"] = dict(self.slos)
        if out["rate"] is not None and math.isinf(out["rate"]):
            out["rate"] = "inf"
        return out


@dataclass(frozen=True)
class Progress:
    """Counters for a live display; rates are over the last few seconds."""

    elapsed: float
    sent: int
    finished: int
    failed: int
    in_flight: int
    request_rate: float
    token_rate: float


@dataclass
class LoadResult:
    """Every record of a run plus the timing the statistics need (`perf_counter` seconds)."""

    settings: LoadSettings
    records: list[RequestRecord]
    t0: float
    send_end: float
    finished_at: float
    interrupted: bool = False
    shares: dict[str, float] = field(default_factory=dict)


def build_workload(settings: LoadSettings) -> Workload:
    mix = AdapterMix.parse(settings.mix, list(settings.models))
    if settings.prompts is not None:
        prompts = load_prompts(settings.prompts)
    else:
        count = min(settings.requests or 1000, 1000)
        rng = random.Random(f"prompts-{settings.seed}")
        prompts = synthetic_prompts(
            rng,
            count=count,
            input_len=LengthDist.parse(settings.input_len),
            endpoint=settings.endpoint,
        )
    return Workload(
        prompts=prompts,
        mix=mix,
        output_len=LengthDist.parse(settings.output_len),
        seed=settings.seed,
        users=settings.users,
        ignore_eos=settings.ignore_eos,
        prompt_order=settings.prompt_order,
    )


class _Counters:
    def __init__(self, t0: float) -> None:
        self.t0, self.sent, self.finished, self.failed, self.tokens = t0, 0, 0, 0, 0
        self._recent: deque[tuple[float, int, int]] = deque()

    def done(self, record: RequestRecord) -> None:
        if record.ok:
            self.finished += 1
            self.tokens += record.output_tokens
        elif not record.cancelled:
            self.failed += 1

    def snapshot(self, *, window: float = 5.0) -> Progress:
        now = time.perf_counter()
        total = self.finished + self.failed
        self._recent.append((now, total, self.tokens))
        while len(self._recent) > 1 and now - self._recent[0][0] > window:
            self._recent.popleft()
        t, n, k = self._recent[0]
        span = now - t
        return Progress(
            elapsed=now - self.t0,
            sent=self.sent,
            finished=self.finished,
            failed=self.failed,
            in_flight=self.sent - total,
            request_rate=(total - n) / span if span > 0 else 0.0,
            token_rate=(self.tokens - k) / span if span > 0 else 0.0,
        )


async def run_load(
    settings: LoadSettings,
    *,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    progress_interval: float = 0.25,
    workload: Workload | None = None,
) -> LoadResult:
    """Run the load test; setting `stop` ends it early with whatever was measured."""
    workload = workload or build_workload(settings)
    stop = stop or asyncio.Event()
    pool = settings.concurrency or DEFAULT_POOL
    client = OpenAIHTTPClient(
        settings.url,
        max_connections=pool,
        stream=settings.stream,
        timeout=settings.timeout,
        api_key=settings.api_key,
    )
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    counters = _Counters(t0)
    driver = _Driver(settings, workload, client, records, counters, t0)
    drive = asyncio.create_task(driver.drive())
    stopper = asyncio.create_task(stop.wait())
    ticker = asyncio.create_task(_tick(counters, on_progress, progress_interval))
    interrupted = False
    try:
        await asyncio.wait({drive, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not drive.done():
            interrupted = True
            drive.cancel()
            await driver.cancel_in_flight()
            await asyncio.gather(drive, return_exceptions=True)
            for record in records:
                if record.start == 0.0:  # cancelled before it was sent
                    record.error = CANCELLED
        else:
            drive.result()
    finally:
        for task in (stopper, ticker):
            task.cancel()
        await asyncio.gather(stopper, ticker, return_exceptions=True)
        await client.aclose()
    if on_progress is not None:
        on_progress(counters.snapshot())
    return LoadResult(
        settings=settings,
        records=records,
        t0=t0,
        send_end=driver.send_end or time.perf_counter(),
        finished_at=time.perf_counter(),
        interrupted=interrupted,
        shares=workload.mix.shares(),
    )


async def _tick(
    counters: _Counters, on_progress: Callable[[Progress], None] | None, interval: float
) -> None:
    if on_progress is None:
        return
    while True:
        on_progress(counters.snapshot())
        await asyncio.sleep(interval)


class _Driver:
    """Sends requests on schedule (open loop) or as slots free up (closed loop)."""

    def __init__(
        self,
        settings: LoadSettings,
        workload: Workload,
        client: OpenAIHTTPClient,
        records: list[RequestRecord],
        counters: _Counters,
        t0: float,
    ) -> None:
        self.settings, self.workload, self.client = settings, workload, client
        self.records, self.counters, self.t0 = records, counters, t0
        self.deadline = t0 + settings.duration if settings.duration else math.inf
        self.budget = settings.requests if settings.requests is not None else math.inf
        self.in_flight: set[asyncio.Task] = set()
        self.send_end: float | None = None

    def _more(self) -> bool:
        return self.counters.sent < self.budget and time.perf_counter() < self.deadline

    def _next(self) -> tuple[RequestSpec, RequestRecord]:
        spec = self.workload.next_spec()
        record = RequestRecord(spec.index, spec.model, user=spec.user, max_tokens=spec.max_tokens)
        self.records.append(record)
        self.counters.sent += 1
        return spec, record

    async def _one(self, spec: RequestSpec, record: RequestRecord) -> None:
        await self.client.send(spec, record)
        self.counters.done(record)

    async def drive(self) -> None:
        s = self.settings
        if s.rate is None:
            await self._closed_loop(s.concurrency or 1)
        else:
            await self._open_loop(s.rate)

    async def _closed_loop(self, concurrency: int) -> None:
        async def worker() -> None:
            while self._more():
                spec, record = self._next()
                self.send_end = time.perf_counter()
                await self._one(spec, record)

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        self.in_flight.update(workers)
        await asyncio.gather(*workers)

    async def _open_loop(self, rate: float) -> None:
        s = self.settings
        process = ArrivalProcess(rate, kind=s.arrival, burstiness=s.burstiness)
        cap = asyncio.Semaphore(s.concurrency) if s.concurrency else None
        rng = random.Random(f"arrivals-{s.seed}")
        due = self.t0
        for gap in process.intervals(rng):
            due += gap
            # Always yield, even when behind schedule, so responses keep being read.
            await asyncio.sleep(max(min(due, self.deadline) - time.perf_counter(), 0.0))
            if not self._more():
                break
            if cap is not None:
                await cap.acquire()
            task = asyncio.create_task(self._capped(*self._next(), cap))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
        self.send_end = time.perf_counter()
        while self.in_flight:
            await asyncio.gather(*list(self.in_flight), return_exceptions=True)

    async def _capped(
        self, spec: RequestSpec, record: RequestRecord, cap: asyncio.Semaphore | None
    ) -> None:
        try:
            await self._one(spec, record)
        finally:
            if cap is not None:
                cap.release()

    async def cancel_in_flight(self) -> None:
        tasks = list(self.in_flight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
