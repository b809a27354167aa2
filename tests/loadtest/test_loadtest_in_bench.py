"""How the benchmarks use loadtest: the serving bench's workload and figures (against the stub),
and the agreement check with `vllm bench serve` (parsing and comparison; no engine)."""

from __future__ import annotations

import json

import pytest

from bench import loadtest_agreement as agreement
from bench._load import (
    BenchRequestError,
    measure_scenario,
    round_robin_models,
    scenario_result,
    write_prompts,
)
from bench._workload import PROMPTS, WorkItem, warmup_items, work_items
from loadtest.stub import StubBehaviour, StubServer
from loadtest.workload import load_prompts


def test_bench_models_must_cycle_round_robin():
    assert round_robin_models(work_items("mixed", requests=10)) == ("a1", "a2", "a3", "a4")
    assert round_robin_models(work_items("base", requests=3)) == ("smollm2",)
    items = [WorkItem(0, "a", "x"), WorkItem(1, "b", "y"), WorkItem(2, "b", "z")]
    with pytest.raises(ValueError, match="round-robin"):
        round_robin_models(items)


def test_bench_scenario_through_loadtest_sends_the_items_in_order(tmp_path):
    bodies: list[dict] = []

    def record(_number: int, body: dict) -> None:
        bodies.append(body)

    items = work_items("mixed", requests=20)
    warmup = warmup_items("mixed")
    with StubServer(StubBehaviour(ttft=0.01, itl=0.002, fail=record)) as stub:
        result = measure_scenario(
            stub.url, items=items, warmup=warmup, concurrency=1, max_tokens=16, folder=tmp_path
        )
    sent_warmup, sent = bodies[: len(warmup)], bodies[len(warmup) :]
    # Request i carries item i's model and prompt (one in flight, so arrival order is send order).
    assert [(b["model"], b["messages"][0]["content"]) for b in sent] == [
        (item.model, item.prompt) for item in items
    ]
    assert [b["model"] for b in sent_warmup] == [item.model for item in warmup]
    assert {b["max_tokens"] for b in sent_warmup} == {8} and {b["max_tokens"] for b in sent} == {16}
    assert all(b["temperature"] == 0.0 and b["ignore_eos"] is True and b["stream"] for b in bodies)
    assert result.requests == 20 and result.output_tokens_total == 20 * 16
    assert result.models == ("a1", "a2", "a3", "a4") and result.concurrency == 1
    assert 10 <= result.ttft_median_ms <= result.ttft_p90_ms <= result.e2e_median_ms
    assert result.output_tokens_per_second == pytest.approx(
        result.output_tokens_total / result.wall_seconds, rel=0.01
    )
    summary = json.loads((tmp_path / "measured" / "summary.json").read_text())
    assert summary["settings"]["mix"] == "round-robin"
    assert (tmp_path / "measured" / "requests.csv").is_file()


def _summary(**overall) -> dict:
    base = {
        "failed": 0, "completed": 4, "errors_by_status": {}, "output_tokens": 256,
        "output_token_throughput": 123.456, "token_source": {"usage": 4},
        "ttft_ms": {"mean": 101.0, "p50": 100.04, "p90": 150.06},
        "tpot_ms": {"mean": 30.0, "p50": 29.0}, "e2e_ms": {"mean": 2100.0, "p50": 2000.0},
    }  # fmt: skip
    return {
        "sent": 4,
        "settings": {"concurrency": 2, "models": ("a1", "a2")},
        "window": {"duration_s": 2.0736},
        "overall": {**base, **overall},
    }


def test_bench_figures_come_from_the_loadtest_summary():
    result = scenario_result(_summary())
    assert (result.requests, result.concurrency, result.models) == (4, 2, ("a1", "a2"))
    assert (result.output_tokens_total, result.wall_seconds) == (256, 2.074)
    assert result.output_tokens_per_second == 123.46
    assert (result.ttft_median_ms, result.ttft_p90_ms, result.e2e_median_ms) == (
        100.0,
        150.1,
        2000.0,
    )
    with pytest.raises(BenchRequestError, match=r"3 of 4 requests succeeded.*'500': 1"):
        scenario_result(_summary(failed=1, completed=3, errors_by_status={"500": 1}))
    with pytest.raises(BenchRequestError, match="usage chunk"):
        scenario_result(_summary(token_source={"chunks": 4}))


def test_agreement_tools_read_the_same_prompts_in_the_same_order(tmp_path):
    items = work_items("base", requests=20)
    vllm_rows = agreement.write_vllm_dataset(items, tmp_path / "v.jsonl").read_text().splitlines()
    ours = load_prompts(write_prompts(items, tmp_path / "l.jsonl"))
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(20)]
    assert [json.loads(row)["prompt"] for row in vllm_rows] == texts
    assert [p.messages for p in ours] == [[{"role": "user", "content": t}] for t in texts]
    # Warm-up: each distinct (prompt, model) pair once.
    assert len(agreement.warmup_items(items)) == 16
    assert len(agreement.warmup_items(work_items("mixed", requests=48))) == 16
    assert len(agreement.warmup_items(work_items("base", requests=8))) == 8


def test_agreement_vllm_arguments(tmp_path):
    common = {
        "base_url": "http://127.0.0.1:8001", "model_dir": tmp_path / "model",
        "dataset": tmp_path / "v.jsonl", "concurrency": 8, "output_len": 64,
        "result_dir": tmp_path, "result_file": "vllm-round1.json",
    }  # fmt: skip
    argv = agreement.vllm_bench_argv(items=work_items("base", requests=48), **common)

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert value("--backend") == "openai-chat" and value("--endpoint") == "/v1/chat/completions"
    assert value("--dataset-name") == "custom" and value("--num-prompts") == "48"
    assert value("--custom-output-len") == "64" and value("--max-concurrency") == "8"
    assert value("--request-rate") == "inf" and value("--temperature") == "0"
    assert value("--served-model-name") == "smollm2"
    assert value("--tokenizer") == str(tmp_path / "model")
    for flag in ("--ignore-eos", "--skip-chat-template", "--disable-shuffle", "--save-result"):
        assert flag in argv
    assert "--lora-modules" not in argv and "--burstiness" not in argv
    paced = agreement.vllm_bench_argv(items=work_items("base", requests=4), rate=2.5, **common)
    # Constant intervals, as loadtest's `constant` arrivals: request i is sent at (i + 1) / rate.
    assert paced[paced.index("--request-rate") + 1] == "2.5"
    assert paced[paced.index("--burstiness") + 1] == "inf"
    mixed = agreement.vllm_bench_argv(items=work_items("mixed", requests=8), **common)
    at = mixed.index("--lora-modules")
    assert mixed[at + 1 : at + 6] == ["a1", "a2", "a3", "a4", "--lora-assignment"]
    assert mixed[at + 6] == "round-robin"
    assert "--header" not in argv
    closing = agreement.vllm_bench_argv(
        items=work_items("base", requests=4), close_connections=True, **common
    )  # llama-server: cpp-httplib drops kept-alive connections, as loadtest's client knows
    assert closing[closing.index("--header") + 1] == "connection=close"


def test_agreement_against_llamacpp_is_base_only(capsys):
    for extra in (["--scenario", "one"], ["--model", "/some/model"]):
        with pytest.raises(SystemExit, match="base scenario only"):
            agreement.main(["--server", "llamacpp", *extra])


def test_agreement_rounds_alternate_abba():
    assert agreement.round_order(2) == [
        (1, "vllm"), (1, "loadtest"), (2, "loadtest"), (2, "vllm"),
    ]  # fmt: skip
    assert agreement.round_order(1) == [(1, "vllm"), (1, "loadtest")]


def _vllm_result(**extra) -> dict:
    return {
        "num_prompts": 4, "completed": 4, "failed": 0, "mean_ttft_ms": 100.0,
        "median_ttft_ms": 90.0, "p90_ttft_ms": 150.0, "mean_tpot_ms": 30.0,
        "median_tpot_ms": 29.0, "output_throughput": 200.0, "mean_e2el_ms": 2100.0,
        "median_e2el_ms": 2000.0, **extra,
    }  # fmt: skip


def test_agreement_figures_from_both_result_files():
    assert agreement.vllm_figures(_vllm_result()) == {
        "ttft_mean_ms": 100.0, "ttft_median_ms": 90.0, "tpot_mean_ms": 30.0,
        "tpot_median_ms": 29.0, "output_tokens_per_second": 200.0, "e2e_mean_ms": 2100.0,
        "e2e_median_ms": 2000.0, "ttft_p90_ms": 150.0,
    }  # fmt: skip
    with pytest.raises(agreement.AgreementError, match="3 of 4"):
        agreement.vllm_figures(_vllm_result(completed=3, failed=1))
    with pytest.raises(agreement.AgreementError, match="lacks median_tpot_ms"):
        agreement.vllm_figures({k: v for k, v in _vllm_result().items() if k != "median_tpot_ms"})
    ours = agreement.loadtest_figures(_summary())
    assert ours["ttft_mean_ms"] == 101.0 and ours["ttft_median_ms"] == 100.04
    assert ours["tpot_median_ms"] == 29.0 and ours["output_tokens_per_second"] == 123.456
    with pytest.raises(agreement.AgreementError, match="3 of 4"):
        agreement.loadtest_figures(_summary(failed=1, completed=3))
    with pytest.raises(agreement.AgreementError, match="no tpot_ms.mean"):
        agreement.loadtest_figures(_summary(tpot_ms={"mean": None, "p50": None}))


def test_agreement_compares_round_means_within_the_tolerance():
    keys = [m.key for m in agreement.METRICS]
    vllm_rounds = [dict.fromkeys(keys, 100.0), dict.fromkeys(keys, 110.0)]  # mean 105
    loadtest_rounds = [dict.fromkeys(keys, 108.0), dict.fromkeys(keys, 108.0)]
    loadtest_rounds[0]["tpot_mean_ms"] = 99.0  # mean 103.5
    loadtest_rounds[1]["e2e_median_ms"] = 200.0  # informational only
    rows = {r.metric: r for r in agreement.compare(vllm_rounds, loadtest_rounds, tolerance=0.05)}
    ttft = rows["ttft_mean_ms"]
    assert (ttft.vllm, ttft.loadtest) == (105.0, 108.0)
    assert ttft.relative_difference == pytest.approx(3 / 105) and ttft.within_tolerance
    assert ttft.vllm_spread == pytest.approx(10 / 105) and ttft.loadtest_spread == 0.0
    assert rows["tpot_mean_ms"].relative_difference == pytest.approx(-1.5 / 105)
    assert not rows["e2e_median_ms"].within_tolerance and not rows["e2e_median_ms"].judged
    assert agreement.agreed(list(rows.values()))
    rows = agreement.compare(vllm_rounds, loadtest_rounds, tolerance=0.02)
    assert not agreement.agreed(rows)
    text = agreement.table(rows, tolerance=0.02)
    assert "within 2%" in text and "NO" in text and "(info)" in text and "+2.9%" in text
    with pytest.raises(agreement.AgreementError, match="at least one round"):
        agreement.compare([], loadtest_rounds)


PROMETHEUS = """\
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="smollm2"} 3.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="smollm2"} %(ttft)s
vllm:time_to_first_token_seconds_count{engine="0",model_name="smollm2"} %(n)s
vllm:request_time_per_output_token_seconds_sum{engine="0",model_name="smollm2"} %(tpot)s
vllm:request_time_per_output_token_seconds_count{engine="0",model_name="smollm2"} %(n)s
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="smollm2"} %(e2e)s
vllm:e2e_request_latency_seconds_count{engine="0",model_name="smollm2"} %(n)s
vllm:e2e_request_latency_seconds_created{engine="0",model_name="smollm2"} 1.7e9
"""


def test_agreement_server_view_from_prometheus_histograms():
    before = agreement.histogram_totals(PROMETHEUS % {"ttft": 1.0, "tpot": 0.5, "e2e": 20, "n": 10})
    after = agreement.histogram_totals(PROMETHEUS % {"ttft": 1.6, "tpot": 0.62, "e2e": 28, "n": 14})
    assert before["vllm:time_to_first_token_seconds"] == (1.0, 10.0)
    means = agreement.server_means(before, after)
    assert means == pytest.approx(
        {"ttft_mean_ms": 150.0, "tpot_mean_ms": 30.0, "e2e_mean_ms": 2000.0}
    )
    assert agreement.server_means(after, after) is None  # no request in between
    rounds = [
        {"tool": "vllm", "figures": {"ttft_mean_ms": 160.0, "tpot_mean_ms": 31.0,
                                     "e2e_mean_ms": 2030.0}, "server": means},
        {"tool": "loadtest", "figures": {"ttft_mean_ms": 150.0, "tpot_mean_ms": 29.0,
                                         "e2e_mean_ms": 1900.0},
         "server": {"ttft_mean_ms": 140.0, "tpot_mean_ms": 28.0, "e2e_mean_ms": 1870.0}},
    ]  # fmt: skip
    view = agreement.server_view(rounds)
    assert view["vllm"]["ttft_mean_ms"] == pytest.approx(
        {"tool": 160.0, "server": 150.0, "offset": 10.0}
    )
    assert view["loadtest"]["tpot_mean_ms"]["offset"] == pytest.approx(1.0)
    # The tools differ by 6% in TTFT, but so did the server in their rounds: taken out, 0.4%.
    relative = agreement.relative_to_server(view, tolerance=0.05)
    ttft = relative["ttft_mean_ms"]
    assert ttft["relative_difference"] == pytest.approx((150 / 140) / (160 / 150) - 1)
    assert ttft["within_tolerance"] and ttft["judged"] and not relative["e2e_mean_ms"]["judged"]
    assert not agreement.relative_to_server(view, tolerance=0.001)["ttft_mean_ms"][
        "within_tolerance"
    ]
    assert agreement.relative_to_server({"vllm": view["vllm"]}) == {}
    text = agreement.server_table(view)
    assert "160.00 / 150.00 / +10.00" in text and "+0.4%  yes" in text and "(info)" in text
