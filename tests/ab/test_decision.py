"""The decision engine on planted data: a clearly worse candidate is rolled back, a clearly
better one promoted, an equal one held; guardrails, sample-ratio mismatch and the ramp."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from registry.experiment_records import UserOutcome
from server.ab.analysis import Analysis
from server.ab.config import ExperimentConfig
from server.ab.decision import ADVANCE, CONTINUE, HOLD, PROMOTE, ROLLBACK, STOP
from tests.ab.factories import experiment

QUICK = {"min_users_per_arm": 50, "dwell_seconds": 0, "final_dwell_seconds": 0,
         "window_seconds": 60}  # fmt: skip


def _users(n: int, *, p_control: float, p_candidate: float, seed: int = 0, errors=(0.0, 0.0),
           slow=(0.0, 0.0), requests: int = 4) -> list[UserOutcome]:  # fmt: skip
    """n users alternating arms at random; each rated every request with P(score=1) = p."""
    rng = np.random.default_rng(seed)
    start = datetime.now(UTC) - timedelta(hours=2)
    out = []
    for i in range(n):
        arm = int(rng.integers(0, 2))
        p = p_candidate if arm else p_control
        ratings = rng.random(requests) < p
        errs = int((rng.random(requests) < errors[arm]).sum())
        out.append(UserOutcome(
            user_hash=f"{i:032x}", variant=arm, first_seen_at=start + timedelta(seconds=i),
            requests=requests, errors=errs, slow=int((rng.random(requests) < slow[arm]).sum()),
            output_tokens=10 * requests, feedback_sum=float(ratings.sum()),
            feedback_count=requests,
            first_error_at=start + timedelta(seconds=i) if errs else None,
        ))  # fmt: skip
    return out


def _decide(users, *, config=None, ramp=(50.0,), step=0, exposures=None, started_ago=10**5,
            step_ago=10**5):  # fmt: skip
    cfg = {**QUICK, **(config or {})}
    exp = experiment(ramp=ramp, step=step, config=cfg, started_ago=started_ago, step_ago=step_ago)
    analysis = Analysis(exp, ExperimentConfig(**cfg))
    analysis.add_users(users)
    analysis.add_first_errors([u for u in users if u.first_error_at is not None])
    counts = exposures or {
        0: sum(u.variant == 0 for u in users),
        1: sum(u.variant == 1 for u in users),
    }
    analysis.look_at_ratio(counts)
    return analysis.decide(datetime.now(UTC)), analysis


def test_a_clearly_better_candidate_is_promoted_once_guardrails_are_shown_within_margins():
    users = _users(2000, p_control=0.3, p_candidate=0.8)
    decision, _ = _decide(users[:600])  # better already, but 300 users per arm cannot show
    assert decision.action == CONTINUE  # an error-rate increase below 0.02 yet
    assert "guardrails are not yet shown within their margins" in decision.reason
    decision, _ = _decide(users)
    assert decision.action == PROMOTE, decision.reason
    assert decision.candidate == 1


def test_a_clearly_worse_candidate_is_rolled_back():
    decision, _ = _decide(_users(600, p_control=0.8, p_candidate=0.3))
    assert decision.action == ROLLBACK, decision.reason
    assert "significantly worse" in decision.reason


def test_an_equal_candidate_is_held_at_the_last_step():
    decision, analysis = _decide(_users(600, p_control=0.6, p_candidate=0.6, seed=3))
    assert decision.action == CONTINUE, decision.reason
    stats = analysis.statistics()["comparisons"]["1"]["primary"]
    assert stats["lower"] < 0 < stats["upper"]


def test_too_few_users_hold():
    decision, _ = _decide(_users(40, p_control=0.1, p_candidate=0.9))
    assert decision.action == HOLD and "too few users" in decision.reason


def test_an_error_guardrail_rolls_back_even_when_feedback_is_better():
    users = _users(800, p_control=0.5, p_candidate=0.7, errors=(0.01, 0.3))
    decision, _ = _decide(users)
    assert decision.action == ROLLBACK and "errors" in decision.reason, decision.reason


def test_a_latency_guardrail_rolls_back():
    users = _users(800, p_control=0.5, p_candidate=0.5, slow=(0.0, 0.5))
    decision, _ = _decide(users)
    assert decision.action == ROLLBACK and "latency-p95" in decision.reason, decision.reason


def test_guardrails_can_be_switched_off():
    users = _users(800, p_control=0.5, p_candidate=0.5, slow=(0.0, 0.5), seed=5)
    decision, _ = _decide(users, config={"guardrails": {}})
    assert decision.action == CONTINUE, decision.reason


def test_sample_ratio_mismatch_freezes_everything_but_a_rollback():
    users = _users(600, p_control=0.3, p_candidate=0.8)
    decision, _ = _decide(users, exposures={0: 5400, 1: 4600})
    assert decision.action == HOLD and "sample ratio mismatch" in decision.reason


def test_the_ramp_advances_after_its_dwell_and_not_before():
    users = _users(300, p_control=0.5, p_candidate=0.5)
    ramp = (10.0, 50.0)
    decision, _ = _decide(users, ramp=ramp, config={"dwell_seconds": 600}, step_ago=10)
    assert decision.action == CONTINUE and "dwell" in decision.reason
    decision, _ = _decide(users, ramp=ramp, config={"dwell_seconds": 600}, step_ago=601)
    assert decision.action == ADVANCE


def test_promotion_waits_for_the_minimum_time_at_the_last_step():
    users = _users(600, p_control=0.3, p_candidate=0.8)
    decision, _ = _decide(
        users, config={"final_dwell_seconds": 3600, "guardrails": {}}, step_ago=60
    )
    assert decision.action == CONTINUE and "minimum time" in decision.reason


def test_timeout_keeps_the_control_or_promotes_a_noninferior_candidate():
    users = _users(600, p_control=0.6, p_candidate=0.6, seed=3)
    timeout = {"max_runtime_seconds": 3600, "window_seconds": 60}
    decision, _ = _decide(users, config=timeout, started_ago=7200)
    assert decision.action == STOP
    decision, _ = _decide(users, config={**timeout, "promote_if_noninferior": True,
                                         "noninferiority_margin": 0.2, "guardrails": {}},
                          started_ago=7200)  # fmt: skip
    assert decision.action == PROMOTE and "non-inferior" in decision.reason


def test_state_round_trip_gives_the_same_decision():
    users = _users(600, p_control=0.3, p_candidate=0.8)
    cfg = {**QUICK}
    exp = experiment(ramp=(50.0,), config=cfg, started_ago=10**5, step_ago=10**5)
    whole = Analysis(exp, ExperimentConfig(**cfg))
    whole.add_users(users)
    first = Analysis(exp, ExperimentConfig(**cfg))
    first.add_users(users[:250])
    resumed = Analysis(
        experiment(ramp=(50.0,), config=cfg, analysis=first.to_state(), started_ago=10**5,
                   step_ago=10**5), ExperimentConfig(**cfg),
    )  # fmt: skip
    resumed.add_users(users[250:])
    a, b = whole.statistics()["comparisons"]["1"], resumed.statistics()["comparisons"]["1"]
    assert a["primary"]["lower"] == pytest.approx(b["primary"]["lower"], abs=1e-9)
    assert a["primary"]["upper"] == pytest.approx(b["primary"]["upper"], abs=1e-9)


def test_users_without_feedback_count_as_neutral():
    users = [
        UserOutcome(f"{i:032x}", i % 2, datetime.now(UTC), 1, 0, 0, 1, 0.0, 0, None)
        for i in range(200)
    ]
    _, analysis = _decide(users)
    primary = analysis.statistics()["comparisons"]["1"]["primary"]
    assert primary["candidate_mean"] == pytest.approx(0.5)
    assert primary["control_mean"] == pytest.approx(0.5)
