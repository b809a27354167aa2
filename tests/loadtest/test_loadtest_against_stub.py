"""The generator against a stub server with known delays: the numbers it reports must match."""

from __future__ import annotations

import asyncio
import csv
import json
import time
from collections.abc import Iterator

import pytest

from loadtest.report import CSV_COLUMNS, write_report
from loadtest.runner import LoadSettings, run_load
from loadtest.stub import StubBehaviour, StubServer

TTFT, ITL, TOKENS = 0.05, 0.01, 8


@pytest.fixture
def stub() -> Iterator[StubServer]:
    """A stub with the default known delays; tests that need other behaviour start their own."""
    with StubServer(StubBehaviour(ttft=TTFT, itl=ITL, tokens=TOKENS)) as server:
        yield server


def _run(url: str, **overrides) -> tuple:
    settings = LoadSettings(
        url=url,
        models=overrides.pop("models", ("a", "b")),
        **{"concurrency": 4, "requests": 12, "output_len": str(TOKENS), **overrides},
    )
    result = asyncio.run(run_load(settings))
    return result, write_report(result, None)


def test_loadtest_known_delays_come_back_as_ttft_itl_tpot_e2e(stub):
    _, summary = _run(stub.url, slos=(("ttft", 0.5), ("tpot", 0.1)))
    o = summary["overall"]
    assert (o["requests"], o["completed"], o["failed"]) == (12, 12, 0)
    assert o["token_source"] == {"usage": 12}
    assert o["output_tokens"] == 12 * TOKENS
    # Lower bounds are hard (the stub sleeps at least that long); upper bounds leave room for a
    # loaded 2-core machine.
    assert 50 <= o["ttft_ms"]["p50"] <= 80
    assert 9 <= o["itl_ms"]["mean"] <= 16
    assert o["itl_ms"]["count"] == 12 * (TOKENS - 1)
    assert 9 <= o["tpot_ms"]["mean"] <= 16
    e2e = (TTFT + ITL * (TOKENS - 1)) * 1000
    assert e2e <= o["e2e_ms"]["p50"] <= e2e + 40
    assert o["goodput"] == {
        "good": 12,
        "share": 1.0,
        "rate": pytest.approx(o["request_throughput"]),
    }
    # Concurrency 4 and ~0.12 s per request: ~33 req/s; the window is the whole run.
    assert 15 <= o["request_throughput"] <= 34
    assert o["output_token_throughput"] == pytest.approx(o["request_throughput"] * TOKENS)
    assert sum(summary["models"][m]["completed"] for m in ("a", "b")) == 12
    assert o["served_adapters"] == {
        f"{m}@1": summary["models"][m]["completed"]
        for m in ("a", "b")
        if summary["models"][m]["completed"]
    }


def test_loadtest_tight_slo_counts_no_goodput(stub):
    _, summary = _run(stub.url, slos=(("ttft", 0.01),))
    assert summary["overall"]["goodput"]["good"] == 0
    assert summary["overall"]["goodput"]["share"] == 0.0
    assert summary["slos_ms"] == {"ttft": 10.0}


def test_loadtest_counts_chunks_when_the_server_sends_no_usage():
    with StubServer(StubBehaviour(tokens=5, usage=False, variant="b")) as server:
        _, summary = _run(server.url, models=("x",))
    o = summary["overall"]
    assert o["token_source"] == {"chunks": 12}
    assert o["output_tokens"] == 60
    assert o["served_variants"] == {"b": 12}


def test_loadtest_without_streaming_times_whole_answers():
    with StubServer(StubBehaviour(ttft=TTFT, itl=ITL, tokens=TOKENS)) as server:
        result, summary = _run(server.url, stream=False)
    o = summary["overall"]
    assert o["completed"] == 12 and o["ttft_ms"]["count"] == 0 and o["itl_ms"]["count"] == 0
    assert o["output_tokens"] == 12 * TOKENS
    assert o["e2e_ms"]["p50"] >= (TTFT + ITL * (TOKENS - 1)) * 1000


def test_loadtest_errors_are_counted_by_status():
    def fail(number: int, body: dict) -> int | None:
        return {0: 500, 1: 429}.get(number % 5)

    with StubServer(StubBehaviour(tokens=3, fail=fail)) as server:
        result, summary = _run(server.url, concurrency=1, requests=20, slos=(("e2e", 5.0),))
    o = summary["overall"]
    assert (o["completed"], o["failed"]) == (12, 8)
    assert o["errors_by_status"] == {"429": 4, "500": 4}
    assert o["goodput"]["good"] == 12 and o["goodput"]["share"] == pytest.approx(0.6)
    errors = [r for r in result.records if r.status == 500]
    assert errors[0].error == "stub failure 500"
    per_model = summary["models"]
    assert sum(m["errors_by_status"].get("500", 0) for m in per_model.values()) == 4


def test_loadtest_unreachable_server_is_an_error_not_a_crash():
    _, summary = _run("http://127.0.0.1:9", concurrency=2, requests=4)
    assert summary["overall"]["failed"] == 4
    assert summary["overall"]["errors_by_status"] == {"ConnectError": 4}


def test_loadtest_warmup_and_cooldown_are_excluded():
    with StubServer(StubBehaviour(tokens=2)) as server:
        settings = LoadSettings(
            url=server.url, models=("a",), rate=50, arrival="constant", duration=1.0,
            warmup=0.2, cooldown=0.2, output_len="2",
        )  # fmt: skip
        result = asyncio.run(run_load(settings))
    summary = write_report(result, None)
    starts = sorted(r.start - result.t0 for r in result.records)
    assert len(starts) in (49, 50)  # 0.02, 0.04, ... up to 1.0 s
    measured = summary["overall"]["requests"]
    assert 28 <= measured <= 31  # sent in [0.2, ~0.8) s
    assert summary["excluded_warmup_cooldown"] == len(starts) - measured
    assert summary["window"]["start_s"] == 0.2


def test_loadtest_stop_cancels_in_flight_and_reports_partially(tmp_path):
    with StubServer(StubBehaviour(ttft=0.05, itl=0.05, tokens=12)) as server:
        settings = LoadSettings(
            url=server.url, models=("a", "b"), concurrency=3, requests=1000, output_len="12"
        )

        async def stop_soon():
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(1.0, stop.set)
            return await run_load(settings, stop=stop)

        started = time.perf_counter()
        result = asyncio.run(stop_soon())
    assert time.perf_counter() - started < 3
    assert result.interrupted
    summary = write_report(result, tmp_path)
    assert summary["interrupted"] is True
    assert summary["cancelled"] == 3  # the three in flight when it stopped
    assert 3 <= summary["overall"]["completed"] <= 6  # ~0.6 s each, three at a time, for 1 s
    assert summary["sent"] == summary["overall"]["completed"] + 3
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"] is True


def test_loadtest_report_files_are_written(stub, tmp_path):
    settings = LoadSettings(
        url=stub.url, models=("a", "b"), mix="weights:3,1", concurrency=4, requests=12,
        output_len=str(TOKENS), users=3, slos=(("ttft", 0.5),),
    )  # fmt: skip
    result = asyncio.run(run_load(settings))
    summary = write_report(result, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        ["summary.json", "requests.csv", "latency_percentiles.png", "ttft_over_time.png",
         "throughput_over_time.png", "goodput.png"]
    )  # fmt: skip
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["overall"]["completed"] == 12 and on_disk["mix_shares"] == {"a": 0.75, "b": 0.25}
    assert set(on_disk["models"]) == {"a", "b"}
    assert len(summary["files"]) == 6
    with (tmp_path / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and tuple(rows[0]) == CSV_COLUMNS
    assert {r["user"] for r in rows} <= {"user-0", "user-1", "user-2"}
    assert all(
        r["status"] == "200" and r["in_window"] == "1" and r["meets_slos"] == "1" for r in rows
    )
    assert all(float(r["ttft_ms"]) >= 50 and r["output_tokens"] == str(TOKENS) for r in rows)
