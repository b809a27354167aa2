"""server.ab.stats: reference values, batch updates equal to one-at-a-time updates, state that
round-trips through JSON mid-stream, coverage and power on fixed-seed samples, input validation."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from server.ab.stats import (
    DifferenceCS,
    FirstErrorEProcess,
    MeanCS,
    SequentialSRM,
    difference_cs_bounds,
    first_error_log_e,
    log_bayes_factor,
    log_bayes_factor_path,
    mean_cs_bounds,
)

SIDES = ("two", "lower", "upper")


def ab_sample(
    seed: int, users: int, *, delta: float = 0.0, propensity: float = 0.5, base: float = 5 / 7
) -> tuple[np.ndarray, np.ndarray]:
    """Beta outcomes with mean `base` (Beta(5, 2) by default) in control, `base + delta` in
    treatment."""
    rng = np.random.default_rng(seed)
    a = (rng.random(users) < propensity).astype(int)
    y = rng.beta(7 * base, 7 * (1 - base), users)
    treated = rng.beta(7 * (base + delta), 7 * (1 - base - delta), users)
    return np.where(a == 1, treated, y), a


def assert_plain_json(state: dict) -> None:
    for key, value in state.items():
        items = value if isinstance(value, list) else [value]
        assert all(type(item) in (int, float) for item in items), (key, value)
    assert json.loads(json.dumps(state)) == state


# --- reference values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ((10, 10), -0.091577),
        ((520, 480), -0.473125),
        ((5200, 4800), 5.613613),
        ((5100, 4900), -0.329512),
    ],
)
def test_log_bayes_factor_reference_values(counts: tuple[int, int], expected: float) -> None:
    assert log_bayes_factor(counts, (0.5, 0.5), c=100.0) == pytest.approx(expected, abs=1e-6)
    # rho is normalised: weights 1:1 are the same as (½, ½)
    assert log_bayes_factor(counts, (3, 3)) == pytest.approx(expected, abs=1e-6)


def test_sequential_srm_keeps_the_largest_bayes_factor() -> None:
    srm = SequentialSRM((1, 1))
    assert (srm.p_value, srm.fired()) == (1.0, False)
    srm.look((5200, 4800))
    assert srm.p_value == pytest.approx(math.exp(-5.613613), rel=1e-6)
    # BF ≈ 274: past 1/0.01, short of the default 1/0.001
    assert srm.fired(threshold=0.01) and not srm.fired()
    srm.look((5300, 5300))  # balanced again: the current BF drops, the running max does not
    assert srm.log_bf < 0 < srm.max_log_bf
    assert srm.fired(threshold=0.01) and srm.counts == [5300, 5300]


def test_sequential_srm_three_arms() -> None:
    srm = SequentialSRM((0.5, 0.25, 0.25))
    srm.look((500, 250, 250))
    assert not srm.fired(threshold=0.05)
    srm.look((1000, 700, 300))
    assert srm.fired()


def test_log_bayes_factor_path_is_the_bayes_factor_after_each_user() -> None:
    rng = np.random.default_rng(3)
    arms = rng.choice(3, size=300, p=[0.5, 0.3, 0.2])
    rho = (0.5, 0.3, 0.2)
    path = log_bayes_factor_path(arms, rho, c=50.0)
    for u in (0, 1, 17, 150, 299):
        counts = np.bincount(arms[: u + 1], minlength=3)
        assert path[u] == pytest.approx(log_bayes_factor(counts, rho, c=50.0), abs=1e-9)
    two_d = log_bayes_factor_path(np.stack([arms, arms[::-1]]), rho, c=50.0)
    np.testing.assert_allclose(two_d[0], path, atol=1e-12)


def test_first_error_log_e_formula() -> None:
    n, s = 40, 29
    expected = sum(r**s / (1 + (r - 1) * 0.5) ** n for r in FirstErrorEProcess.RATIOS) / 6
    assert first_error_log_e(n, s) == pytest.approx(math.log(expected), rel=1e-12)
    assert first_error_log_e(0, 0) == pytest.approx(0.0, abs=1e-15)


# --- the formulas, written out as plain loops -------------------------------------------------


def reference_lower_bounds(x: list[float], alpha_side: float) -> list[float]:
    """PrPl-EB's L_t (not yet the running max), literally as AB-STATS (a) writes it."""
    c = math.log(1 / alpha_side)
    bounds, sum_x, sum_sq = [], 0.0, 0.0
    sum_lam = sum_lam_x = sum_pen = 0.0
    mean_prev, var_prev = 0.5, 0.25  # μ̃_0, σ̂²_0
    for t, x_t in enumerate(x, start=1):
        lam = min(0.5, math.sqrt(2 * c / (var_prev * t * math.log(1 + t))))
        v = (x_t - mean_prev) ** 2
        sum_lam += lam
        sum_lam_x += lam * x_t
        sum_pen += v * (-math.log(1 - lam) - lam)
        bounds.append((sum_lam_x - c - sum_pen) / sum_lam)
        sum_x += x_t
        mean_prev = (0.5 + sum_x) / (t + 1)
        sum_sq += (x_t - mean_prev) ** 2
        var_prev = (0.25 + sum_sq) / (t + 1)
    return bounds


def test_mean_cs_follows_the_formulas() -> None:
    x = np.random.default_rng(40).beta(3, 4, 300).tolist()
    for sides, alpha_side in (("two", 0.025), ("lower", 0.05)):
        lower, _ = mean_cs_bounds(x, alpha=0.05, sides=sides)
        expected = np.maximum.accumulate(np.maximum(reference_lower_bounds(x, alpha_side), 0.0))
        np.testing.assert_allclose(lower, expected, rtol=0, atol=1e-12)
    # the upper bound is 1 − (the lower bound of 1 − X)
    _, upper = mean_cs_bounds(x, alpha=0.05, sides="upper")
    flipped = reference_lower_bounds([1 - v for v in x], 0.05)
    np.testing.assert_allclose(
        upper, 1 - np.maximum.accumulate(np.maximum(flipped, 0.0)), atol=1e-12
    )


def test_difference_cs_is_mean_cs_on_the_ipw_scores() -> None:
    y, a = ab_sample(41, 400, delta=0.1, propensity=0.3)
    pi, bound = 0.3, 1 / 0.3
    scores, sums, counts = [], [0.0, 0.0], [0, 0]
    for y_u, a_u in zip(y.tolist(), a.tolist(), strict=True):
        m1 = (0.5 + sums[1]) / (1 + counts[1])
        m0 = (0.5 + sums[0]) / (1 + counts[0])
        psi = m1 - m0 + a_u * (y_u - m1) / pi - (1 - a_u) * (y_u - m0) / (1 - pi)
        scores.append((psi + bound) / (2 * bound))
        sums[a_u] += y_u
        counts[a_u] += 1
    x_lower, x_upper = mean_cs_bounds(scores, alpha=0.05)
    lower, upper = difference_cs_bounds(y, a, alpha=0.05, propensity=pi)
    np.testing.assert_allclose(lower, np.clip(2 * bound * x_lower - bound, -1, 1), atol=1e-12)
    np.testing.assert_allclose(upper, np.clip(2 * bound * x_upper - bound, -1, 1), atol=1e-12)


# --- batch == one at a time, paths == classes ------------------------------------------------


@pytest.mark.parametrize("sides", SIDES)
def test_mean_cs_batch_equals_sequential(sides: str) -> None:
    x = np.random.default_rng(1).beta(2, 5, 700)
    batch, one_by_one, chunks = MeanCS(0.1, sides), MeanCS(0.1, sides), MeanCS(0.1, sides)
    batch.update(x)
    for value in x:
        one_by_one.update([value])
    for part in np.array_split(x, 7):
        chunks.update(part)
    for other in (one_by_one, chunks):
        assert other.n == batch.n == 700
        for name in ("mean", "lower", "upper"):
            assert getattr(other, name) == pytest.approx(getattr(batch, name), abs=1e-9)
        for key, value in other.to_state().items():
            assert value == pytest.approx(batch.to_state()[key], rel=1e-9, abs=1e-12)


def test_mean_cs_bounds_path_equals_the_class_after_each_step() -> None:
    x = np.random.default_rng(2).random(200)
    lower, upper = mean_cs_bounds(x, alpha=0.05)
    cs = MeanCS(0.05)
    for t, value in enumerate(x):
        cs.update([value])
        assert (cs.lower, cs.upper) == pytest.approx((lower[t], upper[t]), abs=1e-12)
    assert np.all(np.diff(lower) >= 0) and np.all(np.diff(upper) <= 0)


@pytest.mark.parametrize(("sides", "propensity"), [("two", 0.5), ("lower", 0.5), ("upper", 0.3)])
def test_difference_cs_batch_equals_sequential(sides: str, propensity: float) -> None:
    y, a = ab_sample(4, 600, delta=0.1, propensity=propensity)
    batch, one_by_one = DifferenceCS(0.05, sides, propensity), DifferenceCS(0.05, sides, propensity)
    batch.update(y, a)
    lower, upper = difference_cs_bounds(y, a, alpha=0.05, sides=sides, propensity=propensity)
    for u in range(y.size):
        one_by_one.update(y[u : u + 1], a[u : u + 1])
        if u % 50 == 0:
            assert (one_by_one.lower, one_by_one.upper) == pytest.approx(
                (lower[u], upper[u]), abs=1e-9
            )
    for name in ("n", "n_treatment", "n_control", "mean_treatment", "mean_control", "estimate"):
        assert getattr(one_by_one, name) == pytest.approx(getattr(batch, name), abs=1e-9)
    assert (one_by_one.lower, one_by_one.upper) == pytest.approx(
        (batch.lower, batch.upper), abs=1e-9
    )
    assert (batch.lower, batch.upper) == pytest.approx((lower[-1], upper[-1]), abs=1e-12)
    # rows of a 2-D call are independent experiments
    two_d = difference_cs_bounds(
        np.stack([y, y]), np.stack([a, 1 - a]), sides=sides, propensity=propensity
    )
    np.testing.assert_allclose(two_d[0][0], lower, atol=1e-12)


def test_first_error_batch_equals_sequential() -> None:
    labels = (np.random.default_rng(5).random(500) < 0.6).astype(int)
    batch, one_by_one = FirstErrorEProcess(), FirstErrorEProcess()
    batch.update(labels)
    for label in labels:
        one_by_one.update([label])
    assert (one_by_one.n, one_by_one.treatment) == (batch.n, batch.treatment) == (500, labels.sum())
    assert one_by_one.log_e == pytest.approx(batch.log_e, abs=1e-9)
    assert one_by_one.max_log_e == pytest.approx(batch.max_log_e, abs=1e-9)
    assert batch.max_log_e >= batch.log_e


def best_of_three(update) -> float:
    """Fastest of three runs, so that one scheduling hiccup on a busy machine is not a failure."""
    elapsed = []
    for _ in range(3):
        started = time.perf_counter()
        update()
        elapsed.append(time.perf_counter() - started)
    return min(elapsed)


def test_a_million_users_in_one_batch_is_fast() -> None:
    rng = np.random.default_rng(6)
    y, a = rng.random(1_000_000), rng.integers(0, 2, 1_000_000)
    assert best_of_three(lambda: MeanCS().update(y)) < 1.0
    assert best_of_three(lambda: DifferenceCS().update(y, a)) < 1.0
    assert best_of_three(lambda: FirstErrorEProcess().update(a)) < 1.0
    cs, process = DifferenceCS(), FirstErrorEProcess()
    cs.update(y, a)
    process.update(a)
    assert cs.n == 1_000_000 and -0.01 < cs.lower < 0 < cs.upper < 0.01
    assert math.isfinite(process.log_e) and process.log_e < 0  # no overflow at n = 10^6


# --- state -----------------------------------------------------------------------------------


def test_difference_cs_state_round_trip_mid_stream() -> None:
    y, a = ab_sample(7, 900, delta=0.05, propensity=0.3)
    whole = DifferenceCS(0.1, "lower", 0.3)
    whole.update(y, a)
    first = DifferenceCS(0.1, "lower", 0.3)
    first.update(y[:400], a[:400])
    state = json.loads(json.dumps(first.to_state()))
    assert_plain_json(state)
    restored = DifferenceCS.from_state(state)
    assert restored.to_state() == first.to_state()
    restored.update(y[400:], a[400:])
    assert restored.to_state() == pytest.approx(whole.to_state(), rel=1e-12)
    assert (restored.alpha, restored.sides, restored.propensity) == (0.1, "lower", 0.3)


@pytest.mark.parametrize("sides", SIDES)
def test_mean_cs_state_round_trip_mid_stream(sides: str) -> None:
    x = np.random.default_rng(8).random(300)
    whole, first = MeanCS(0.05, sides), MeanCS(0.05, sides)
    whole.update(x)
    first.update(x[:120])
    restored = MeanCS.from_state(json.loads(json.dumps(first.to_state())))
    assert_plain_json(restored.to_state())
    assert restored.to_state() == first.to_state() and restored.sides == sides
    restored.update(x[120:])
    assert restored.to_state() == pytest.approx(whole.to_state(), rel=1e-12)


def test_first_error_and_srm_state_round_trip() -> None:
    labels = np.random.default_rng(9).integers(0, 2, 200)
    whole, first = FirstErrorEProcess(0.4), FirstErrorEProcess(0.4)
    whole.update(labels)
    first.update(labels[:80])
    restored = FirstErrorEProcess.from_state(json.loads(json.dumps(first.to_state())))
    assert_plain_json(restored.to_state())
    restored.update(labels[80:])
    assert restored.to_state() == pytest.approx(whole.to_state(), rel=1e-12)

    srm = SequentialSRM((0.7, 0.3))
    srm.look((70, 25))
    state = json.loads(json.dumps(srm.to_state()))
    assert_plain_json(state)
    again = SequentialSRM.from_state(state)
    assert again.to_state() == state
    again.look((150, 60))
    srm.look((150, 60))
    assert again.to_state() == srm.to_state()


def test_from_state_refuses_incomplete_or_foreign_state() -> None:
    state = MeanCS().to_state()
    with pytest.raises(ValueError, match="lacks sum_lam"):
        MeanCS.from_state({k: v for k, v in state.items() if k != "sum_lam"})
    with pytest.raises(ValueError, match="version 99"):
        MeanCS.from_state({**state, "version": 99})
    with pytest.raises(ValueError, match="neither a lower nor an upper"):
        MeanCS.from_state({**state, "has_lower": 0, "has_upper": 0})
    with pytest.raises(ValueError, match="lacks propensity"):
        DifferenceCS.from_state(state)


# --- coverage, shrinking, detection ----------------------------------------------------------


def test_mean_cs_shrinks_and_contains_the_truth() -> None:
    x = np.random.default_rng(10).beta(5, 2, 20_000)
    lower, upper = mean_cs_bounds(x)
    widths = [upper[n - 1] - lower[n - 1] for n in (100, 1000, 10_000, 20_000)]
    assert widths == sorted(widths, reverse=True) and widths[-1] < 0.02
    assert np.all(lower <= 5 / 7) and np.all(upper >= 5 / 7)
    cs = MeanCS()
    assert (cs.n, cs.mean, cs.lower, cs.upper) == (0, 0.5, 0.0, 1.0)
    cs.update(x)
    assert cs.mean == pytest.approx(x.mean())


def test_difference_cs_excludes_zero_for_a_clear_difference_only() -> None:
    y, a = ab_sample(11, 400, delta=0.3, base=2 / 7)
    clear = DifferenceCS()
    clear.update(y, a)
    assert 0 < clear.lower < 0.3 < clear.upper
    assert clear.estimate == pytest.approx(clear.mean_treatment - clear.mean_control)
    assert clear.n == 400 and clear.n_treatment + clear.n_control == 400

    y, a = ab_sample(12, 400)
    equal = DifferenceCS()
    equal.update(y, a)
    assert equal.lower < 0 < equal.upper
    empty = DifferenceCS()
    assert (empty.mean_treatment, empty.mean_control, empty.estimate) == (0.5, 0.5, 0.0)
    assert (empty.lower, empty.upper) == (-1.0, 1.0)


def test_one_sided_bounds() -> None:
    y, a = ab_sample(13, 1500, delta=0.1)
    two, lower, upper = (
        DifferenceCS(sides="two"),
        DifferenceCS(sides="lower"),
        DifferenceCS(sides="upper"),
    )
    for cs in (two, lower, upper):
        cs.update(y, a)
    assert lower.upper == 1.0 and upper.lower == -1.0
    # one side at alpha is tighter than that side at alpha/2
    assert two.lower < lower.lower < 0.1 < upper.upper < two.upper
    assert lower.lower > 0

    x = np.random.default_rng(14).random(500)
    only_lower, only_upper = MeanCS(sides="lower"), MeanCS(sides="upper")
    only_lower.update(x)
    only_upper.update(x)
    assert only_lower.upper == 1.0 and only_upper.lower == 0.0
    assert 0 < only_lower.lower < 0.5 < only_upper.upper < 1


def test_difference_cs_with_propensity_0_3_covers_the_truth() -> None:
    for seed in range(5):
        y, a = ab_sample(20 + seed, 3000, delta=0.1, propensity=0.3)
        lower, upper = difference_cs_bounds(y, a, propensity=0.3)
        assert np.all((-1 <= lower) & (lower <= 0.1) & (0.1 <= upper) & (upper <= 1))
        assert a.mean() == pytest.approx(0.3, abs=0.05)
    cs = DifferenceCS(propensity=0.3)
    cs.update(y, a)
    assert 0 < cs.lower < 0.1 < cs.upper < 0.3  # the last sample is also detected


def test_first_error_process_fires_on_a_doubled_error_rate_only() -> None:
    rng = np.random.default_rng(30)
    # Treatment errs twice as often: a first error comes from treatment with probability 2/3.
    doubled, equal = FirstErrorEProcess(), FirstErrorEProcess()
    doubled.update((rng.random(300) < 2 / 3).astype(int))
    equal.update((rng.random(300) < 1 / 2).astype(int))
    assert doubled.fired(0.05) and doubled.max_log_e > math.log(1 / 0.001)
    assert not equal.fired(0.05)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_alpha_must_be_in_the_open_unit_interval(alpha: float) -> None:
    for make in (lambda: MeanCS(alpha), lambda: DifferenceCS(alpha)):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
            make()
    with pytest.raises(ValueError, match="alpha"):
        FirstErrorEProcess().fired(alpha)
    with pytest.raises(ValueError, match="threshold"):
        SequentialSRM((1, 1)).fired(alpha)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="sides must be one of two, lower, upper"):
        MeanCS(sides="both")  # type: ignore[arg-type]
    for bad in ([0.5, 1.2], [-0.1], [float("nan")]):
        with pytest.raises(ValueError, match=r"observations must lie in \[0, 1\]"):
            MeanCS().update(bad)
    cs = DifferenceCS()
    with pytest.raises(ValueError, match="arms must be 0 or 1"):
        cs.update([0.5, 0.5], [1, 2])
    with pytest.raises(ValueError, match="differ in shape"):
        cs.update([0.5, 0.5], [1])
    with pytest.raises(ValueError, match=r"outcomes must lie in \[0, 1\]"):
        cs.update([1.5], [1])
    assert cs.n == 0  # a refused batch changes nothing
    for propensity in (0.0, 1.0):
        with pytest.raises(ValueError, match="propensity"):
            DifferenceCS(propensity=propensity)
        with pytest.raises(ValueError, match="propensity"):
            FirstErrorEProcess(propensity)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        FirstErrorEProcess().update([0, 1, 3])


def test_srm_validation() -> None:
    with pytest.raises(ValueError, match="two or more positive weights"):
        SequentialSRM((1,))
    with pytest.raises(ValueError, match="two or more positive weights"):
        SequentialSRM((0.5, -0.5, 1))
    with pytest.raises(ValueError, match="c must be a positive number"):
        SequentialSRM((1, 1), c=0)
    srm = SequentialSRM((1, 1))
    srm.look((10, 12))
    with pytest.raises(ValueError, match="never decrease"):
        srm.look((11, 11))
    with pytest.raises(ValueError, match="expected 2 counts"):
        srm.look((11, 12, 1))
    with pytest.raises(ValueError, match="non-negative integers"):
        log_bayes_factor((-1, 3), (1, 1))
    with pytest.raises(ValueError, match="integers in 0..1"):
        log_bayes_factor_path([0, 1, 2], (1, 1))
    assert srm.counts == [10, 12]
