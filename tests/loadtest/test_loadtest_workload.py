"""Arrival processes and workload sampling: rates, shares, seeds, parsing errors (no HTTP)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from loadtest.arrivals import ArrivalProcess, parse_arrival
from loadtest.stats import parse_slo, percentile
from loadtest.workload import (
    CHAT,
    AdapterMix,
    LengthDist,
    Workload,
    load_prompts,
    synthetic_prompts,
)


def _ks_exponential(samples: list[float], rate: float) -> float:
    """Kolmogorov-Smirnov distance between the samples and Exp(rate)."""
    xs = sorted(samples)
    n = len(xs)
    d = 0.0
    for i, x in enumerate(xs):
        cdf = 1.0 - math.exp(-rate * x)
        d = max(d, abs(cdf - i / n), abs((i + 1) / n - cdf))
    return d


def test_loadtest_poisson_arrivals_have_the_rate_and_exponential_gaps():
    rate, n = 40.0, 20_000
    gaps = ArrivalProcess(rate).send_times(random.Random(7), count=n)
    gaps = [b - a for a, b in zip([0.0, *gaps], gaps, strict=False)]
    mean = sum(gaps) / n
    # Standard error of the mean of Exp(rate) is 1/(rate*sqrt(n)): 0.7 % here; allow ~4 sigma.
    assert mean == pytest.approx(1 / rate, rel=0.03)
    # KS critical value at alpha = 0.01 is 1.63/sqrt(n).
    assert _ks_exponential(gaps, rate) < 1.63 / math.sqrt(n)


def test_loadtest_gamma_arrivals_keep_the_mean_and_change_the_spread():
    rate, n = 10.0, 20_000
    for shape in (0.5, 4.0):
        it = ArrivalProcess(rate, kind="gamma", burstiness=shape).intervals(random.Random(3))
        gaps = [next(it) for _ in range(n)]
        mean = sum(gaps) / n
        var = sum((g - mean) ** 2 for g in gaps) / n
        assert mean == pytest.approx(1 / rate, rel=0.04)
        # Gamma(k, theta): squared coefficient of variation is 1/k.
        assert var / mean**2 == pytest.approx(1 / shape, rel=0.1)


def test_loadtest_constant_and_unbounded_arrivals():
    assert ArrivalProcess(4.0, kind="constant").send_times(random.Random(0), count=3) == [
        0.25,
        0.5,
        0.75,
    ]
    assert ArrivalProcess(math.inf).send_times(random.Random(0), count=3) == [0.0, 0.0, 0.0]
    assert parse_arrival("poisson", burstiness=0.5) == "gamma"
    assert parse_arrival("poisson", burstiness=1.0) == "poisson"


def test_loadtest_arrival_settings_report_every_problem():
    with pytest.raises(ValueError, match=r"rate must be > 0.*arrival kind.*burstiness"):
        ArrivalProcess(0, kind="bursty", burstiness=-1)


def test_loadtest_zipf_mix_gives_power_law_shares():
    models = ["a", "b", "c", "d"]
    mix = AdapterMix.parse("zipf:1.1", models)
    expected = [1 / r**1.1 for r in range(1, 5)]
    expected = [w / sum(expected) for w in expected]
    assert mix.weights == pytest.approx(expected)
    prompts = synthetic_prompts(random.Random(0), count=5, input_len=LengthDist.parse("4"))
    workload = Workload(prompts=prompts, mix=mix, output_len=LengthDist.parse("8"), seed=1)
    n = 20_000
    counts = Counter(workload.next_spec().model for _ in range(n))
    for model, share in zip(models, expected, strict=True):
        # Binomial standard error is at most 0.0035 at n = 20000; allow ~4 sigma.
        assert counts[model] / n == pytest.approx(share, abs=0.015)


def test_loadtest_weighted_and_uniform_mix():
    assert AdapterMix.parse("weights:3,1,1", ["a", "b", "c"]).shares() == pytest.approx(
        {"a": 0.6, "b": 0.2, "c": 0.2}
    )
    assert AdapterMix.parse("uniform", ["a", "b"]).shares() == {"a": 0.5, "b": 0.5}
    with pytest.raises(ValueError, match="2 weights for 3 models"):
        AdapterMix.parse("weights:1,1", ["a", "b", "c"])
    with pytest.raises(ValueError, match="--mix must be"):
        AdapterMix.parse("pareto:2", ["a"])
    with pytest.raises(ValueError, match="--mix must be"):
        AdapterMix.parse("round-robin:2", ["a"])


def test_loadtest_round_robin_mix_and_sequential_prompts_replay_in_order():
    prompts = synthetic_prompts(random.Random(0), count=3, input_len=LengthDist.parse("4"))
    mix = AdapterMix.parse("round-robin", ["a", "b", "c", "d"])
    assert mix.shares() == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25})
    workload = Workload(
        prompts=prompts, mix=mix, output_len=LengthDist.parse("8"), prompt_order="sequential"
    )
    specs = [workload.next_spec() for _ in range(10)]
    # Request i: model i mod 4 (as `vllm bench serve --lora-assignment round-robin`), prompt i mod 3.
    assert [s.model for s in specs] == ["a", "b", "c", "d", "a", "b", "c", "d", "a", "b"]
    assert [s.body["messages"] for s in specs] == [prompts[i % 3].messages for i in range(10)]
    assert [s.index for s in specs] == list(range(10))
    # A drawn mix with sequential prompts: only the models are random.
    drawn = Workload(
        prompts=prompts,
        mix=AdapterMix.parse("uniform", ["a", "b"]),
        output_len=LengthDist.parse("8"),
        prompt_order="sequential",
    )
    assert [drawn.next_spec().body["messages"] for _ in range(4)] == [
        prompts[i % 3].messages for i in range(4)
    ]
    with pytest.raises(ValueError, match="prompt order must be one of random, sequential"):
        Workload(
            prompts=prompts, mix=mix, output_len=LengthDist.parse("8"), prompt_order="shuffled"
        )


def test_loadtest_workload_is_seeded_with_sticky_users_and_lengths():
    prompts = synthetic_prompts(
        random.Random(0), count=10, input_len=LengthDist.parse("uniform:3,9")
    )
    assert all(3 <= len(p.messages[0]["content"].split()) <= 9 for p in prompts)

    def specs(seed: int):
        w = Workload(
            prompts=prompts,
            mix=AdapterMix.parse("uniform", ["a", "b"]),
            output_len=LengthDist.parse("uniform:4,12"),
            seed=seed,
            users=5,
            ignore_eos=True,
        )
        return [w.next_spec() for _ in range(50)]

    first, again, other = specs(1), specs(1), specs(2)
    assert [(s.model, s.body) for s in first] == [(s.model, s.body) for s in again]
    assert [s.body for s in first] != [s.body for s in other]
    assert {s.user for s in first} <= {f"user-{i}" for i in range(5)}
    assert all(s.body["user"] == s.user and s.body["ignore_eos"] is True for s in first)
    assert all(4 <= s.body["max_tokens"] <= 12 for s in first)
    assert all(s.endpoint == CHAT for s in first)


def test_loadtest_prompt_file_chat_and_raw(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n\n{"prompt": "Once"}\n')
    chat, raw = load_prompts(path)
    assert chat.endpoint == "chat" and chat.messages[0]["content"] == "hi"
    assert raw.endpoint == "completions" and raw.text == "Once"
    path.write_text('{"messages": []}\nnot json\n{"prompt": "ok"}\n')
    with pytest.raises(ValueError, match=r"line 1: expected .*line 2: not JSON"):
        load_prompts(path)


def test_loadtest_parsers():
    assert parse_slo("ttft=500ms") == ("ttft", 0.5)
    assert parse_slo("tpot=0.08s") == ("tpot", 0.08)
    assert parse_slo("e2e=2000") == ("e2e", 2.0)
    with pytest.raises(ValueError, match="METRIC=VALUE"):
        parse_slo("latency=1s")
    with pytest.raises(ValueError, match="uniform:LO,HI"):
        LengthDist.parse("uniform:9,3")
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
