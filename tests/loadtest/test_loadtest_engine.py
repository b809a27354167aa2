"""A short load against loraplex on the real engine: the per-model report holds together."""

from __future__ import annotations

import asyncio

import pytest

from loadtest.report import write_report
from loadtest.runner import LoadSettings, run_load

pytestmark = pytest.mark.engine


def test_loadtest_real_engine_per_model_report(real_server, tmp_path):
    settings = LoadSettings(
        url=real_server.url,
        models=("smollm2", "caps"),
        mix="uniform",
        concurrency=3,
        requests=6,
        output_len="8",
        input_len="12",
        seed=1,
        slos=(("ttft", 60.0),),
    )
    result = asyncio.run(run_load(settings))
    summary = write_report(result, tmp_path)
    assert [r.error for r in result.records] == [""] * 6
    overall = summary["overall"]
    assert overall["completed"] == 6 and overall["failed"] == 0
    assert overall["token_source"] == {"usage": 6}
    assert 6 <= overall["output_tokens"] <= 6 * 8
    sent = {m: sum(1 for r in result.records if r.model == m) for m in settings.models}
    assert sent == {"smollm2": 3, "caps": 3}  # this seed's draw; both models are exercised
    for model, stats in summary["models"].items():
        assert stats["completed"] == sent[model]
        assert stats["ttft_ms"]["count"] == sent[model] and stats["ttft_ms"]["p50"] > 0
        assert stats["e2e_ms"]["p50"] >= stats["ttft_ms"]["p50"]
        assert stats["goodput"]["share"] == 1.0
    # The server says which adapter served each request.
    assert all(a.startswith("caps") for a in summary["models"]["caps"]["served_adapters"])
    assert summary["models"]["caps"]["served_adapters"]
    assert (tmp_path / "latency_percentiles.png").exists()
