"""bench/lora_cpu.py's bookkeeping: the median of a scenario's repeats, the paired ratios and
the agreement of two ops' log-probs."""

from __future__ import annotations

from bench.lora_cpu import _median_samples, agreement, paired_ratios


def _run(tps: float, lora_ms: float) -> dict:
    return {"output_tokens_per_second": tps, "ms_per_step": {"lora_linear": lora_ms},
            "fused_fallback_calls": 0}  # fmt: skip


def test_paired_ratios_divide_runs_of_the_same_cycle():
    samples = {
        "base": [_run(100, 0.3), _run(200, 0.3)],  # the machine doubled its speed in between
        "one": [_run(95, 2.0), _run(190, 2.0)],
        "mixed8": [_run(76, 4.0), _run(171, 4.0)],
    }
    assert paired_ratios(samples) == {"one/base": [0.95, 0.95], "mixed8/one": [0.8, 0.9]}
    assert paired_ratios({"base": samples["base"]}) == {}  # nothing to pair with


def test_median_of_repeats():
    merged = _median_samples([_run(100, 1.0), _run(300, 5.0), _run(120, 2.0)])
    assert merged["output_tokens_per_second"] == 120
    assert merged["repeats_output_tokens_per_second"] == [100, 300, 120]
    assert merged["ms_per_step"] == {"lora_linear": 2.0}


def test_agreement_compares_top_logprobs_up_to_the_first_different_choice():
    reference = [
        [{"1": -0.1, "2": -2.5}, {"7": -0.5, "8": -1.0}],
        [{"3": -0.2, "4": -1.9}, {"5": -0.3}],
    ]
    other = [
        [{"1": -0.1, "2": -2.4, "9": -3.0}, {"7": -0.6, "8": -1.0}],  # token 9: not compared
        [{"3": -1.5, "4": -1.0}, {"5": -9.0}],  # chose 4, not 3: the next position is not compared
    ]
    result = agreement(reference, other)
    assert result["requests_same_tokens"] == "1/2"
    assert abs(result["max_abs_logprob_diff"] - 1.3) < 1e-9
    assert abs(result["median_abs_logprob_diff"] - 0.1) < 1e-9
    assert agreement(reference, reference)["max_abs_logprob_diff"] == 0.0
