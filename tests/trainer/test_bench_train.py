"""bench/train.py without training: its arguments, the examples it writes, the order systems run
in, and the medians, ratios, verdicts and table it reports from given run figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import train as bench_train


def run(tokens_per_second: float, rss: float, tokens: int = 1000) -> dict[str, object]:
    return {"tokens_per_second": tokens_per_second, "peak_rss_mib": rss, "tokens": tokens}


def test_quick_mode_and_bad_arguments() -> None:
    args = bench_train.parse_args(["--quick", "--only", "loraplex,trl"])
    assert (args.rounds, args.steps, args.only) == (1, 3, ("loraplex", "trl"))
    assert bench_train.parse_args(["--trl-override", "gradient_checkpointing=false"]).trl_override \
        == [("gradient_checkpointing", False)]  # fmt: skip
    with pytest.raises(SystemExit, match="--only takes loraplex, trl, peft"):
        bench_train.parse_args(["--only", "loraplex,axolotl"])
    with pytest.raises(SystemExit, match="--steps must be at least 1"):
        bench_train.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--trl-override", "no-equals-sign"])


def test_every_system_gets_the_same_examples(tmp_path: Path) -> None:
    first = bench_train.write_examples(tmp_path / "a.jsonl", 12, seed=3).read_text()
    again = bench_train.write_examples(tmp_path / "b.jsonl", 12, seed=3).read_text()
    assert first == again
    rows = [json.loads(line) for line in first.splitlines()]
    assert len(rows) == 12 and len({r["messages"][0]["content"] for r in rows}) == 12
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)


def test_the_order_rotates_every_round() -> None:
    assert bench_train.rotation(("loraplex", "trl", "peft"), 4) == [
        ("loraplex", "trl", "peft"), ("trl", "peft", "loraplex"),
        ("peft", "loraplex", "trl"), ("loraplex", "trl", "peft"),
    ]  # fmt: skip


def test_medians_ratios_verdicts_and_table() -> None:
    runs = {
        "loraplex": [run(300, 2000), run(100, 2100), run(320, 1900)],
        "trl": [run(200, 2500), run(250, 2400), run(150, 2600)],
        "peft": [run(400, 1800), run(380, 1700), run(390, 1750)],
    }
    summary = bench_train.summarize(runs)
    assert summary["loraplex"]["tokens_per_second"] == 300  # the median, not the mean
    assert summary["trl"]["peak_rss_mib"] == 2500
    ratios = bench_train.ratios(summary)
    assert ratios["speed_loraplex_vs_trl"] == 1.5
    assert ratios["memory_loraplex_vs_trl"] == 0.8
    assert ratios["speed_loraplex_vs_peft"] == round(300 / 390, 3)
    assert bench_train.verdicts(ratios) == {"speed_at_least_trl": True, "memory_at_most_trl": True}
    slower = bench_train.ratios(bench_train.summarize({"loraplex": [run(100, 3000)],
                                                      "trl": [run(200, 2500)]}))  # fmt: skip
    assert bench_train.verdicts(slower) == {"speed_at_least_trl": False,
                                            "memory_at_most_trl": False}  # fmt: skip
    alone = bench_train.ratios(bench_train.summarize({"loraplex": [run(100, 3000)]}))
    assert bench_train.verdicts(alone) == {"speed_at_least_trl": None, "memory_at_most_trl": None}
    text = bench_train.table(summary, ratios)
    assert "loraplex/TRL: speed 1.5x, memory 0.8x" in text
    assert text.splitlines()[1].split()[:3] == ["loraplex", "300", "2000"]
