"""One analysis pass of an experiment: fold the users whose windows have closed into the
always-valid statistics, look at the sample ratio, decide, and (with `auto`) act.

The unit is the user (AB-STATS.md): each user contributes one observation summarising
[first exposure, first exposure + window] once that window has closed, in order of first
exposure: feedback (mean score, a neutral value if none), error share, slow share. Users' first
errors feed the first-error e-process as they arrive. Every procedure keeps O(1) state, persisted
as a few floats with the experiment, so a pass costs what is new since the last one, and the
per-user rows are the log it can be recomputed from.

A pass runs inside `ExperimentStore.analysis`, one database transaction holding the experiment's
row: two replicas never fold the same users or act twice (a lock, not a timer race). Acting moves
the `production` alias and ends the experiment in the same transaction; the alias event carries
the decision, the statistics and the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from registry.experiment_records import ExperimentRecord, UserOutcome
from registry.experiments import AnalysisTx, ExperimentStore
from server.ab.assignment import propensity, treatment_share
from server.ab.config import ExperimentConfig
from server.ab.decision import (
    ADVANCE,
    PROMOTE,
    ROLLBACK,
    STOP,
    Comparison,
    Decision,
    Progress,
    decide,
)
from server.ab.stats import DifferenceCS, FirstErrorEProcess, MeanCS, SequentialSRM

STATE_VERSION = 1
_BATCH_USERS = 200_000
_HISTORY_POINTS = 400
ACTOR = "loraplex-ab"


@dataclass
class _Arms:
    """The procedures of one candidate-vs-control comparison."""

    primary: DifferenceCS
    errors: DifferenceCS
    slow: DifferenceCS
    slo: MeanCS  # the candidate's own slow share, against the absolute SLO
    first_errors: FirstErrorEProcess

    @classmethod
    def new(cls, alpha: float, pi: float) -> _Arms:
        return cls(
            primary=DifferenceCS(alpha, "two", pi),
            errors=DifferenceCS(alpha, "two", pi),
            slow=DifferenceCS(alpha, "two", pi),
            slo=MeanCS(alpha, "lower"),
            first_errors=FirstErrorEProcess(pi),
        )

    @classmethod
    def from_state(cls, state: dict) -> _Arms:
        return cls(
            primary=DifferenceCS.from_state(state["primary"]),
            errors=DifferenceCS.from_state(state["errors"]),
            slow=DifferenceCS.from_state(state["slow"]),
            slo=MeanCS.from_state(state["slo"]),
            first_errors=FirstErrorEProcess.from_state(state["first_errors"]),
        )

    def to_state(self) -> dict:
        return {k: getattr(self, k).to_state() for k in self.__dataclass_fields__}


class Analysis:
    """The persisted statistics of one experiment (its `analysis` JSON)."""

    def __init__(self, experiment: ExperimentRecord, config: ExperimentConfig):
        self.experiment = experiment
        self.config = config
        candidates = experiment.variants[1:]
        self.alpha = config.alpha / len(candidates)  # Bonferroni over candidates
        state = experiment.analysis or {}
        if state.get("version") == STATE_VERSION:
            self.arms = {int(k): _Arms.from_state(v) for k, v in state["comparisons"].items()}
            self.srm = SequentialSRM.from_state(state["srm"])
            self.history: list[dict] = list(state.get("history", []))
        else:
            self.arms = {
                v.index: _Arms.new(self.alpha, propensity(experiment, v)) for v in candidates
            }
            weights = [0.5, 0.5] if experiment.ramp else [v.weight for v in experiment.variants]
            self.srm = SequentialSRM(weights)
            self.history = []

    def to_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "comparisons": {str(k): a.to_state() for k, a in self.arms.items()},
            "srm": self.srm.to_state(),
            "history": self.history,
        }

    # -- folding data in ----------------------------------------------------------------------

    def add_users(self, users: Sequence[UserOutcome]) -> None:
        """Users whose windows closed, in order of first exposure."""
        if not users:
            return
        variant = np.fromiter((u.variant for u in users), dtype=np.int64, count=len(users))
        requests = np.fromiter((max(u.requests, 1) for u in users), float, count=len(users))
        fb_count = np.fromiter((u.feedback_count for u in users), float, count=len(users))
        fb_sum = np.fromiter((u.feedback_sum for u in users), float, count=len(users))
        errors = np.fromiter((u.errors for u in users), float, count=len(users)) / requests
        slow = np.fromiter((u.slow for u in users), float, count=len(users)) / requests
        neutral = self.config.neutral_feedback
        feedback = np.where(fb_count > 0, fb_sum / np.maximum(fb_count, 1), neutral)
        outcomes = {
            "primary": np.clip(feedback, 0, 1),
            "errors": np.clip(errors, 0, 1),
            "slow": np.clip(slow, 0, 1),
        }
        for index, arms in self.arms.items():
            pair = (variant == 0) | (variant == index)
            if not pair.any():
                continue
            a = (variant[pair] == index).astype(np.int64)
            for name, y in outcomes.items():
                getattr(arms, name).update(y[pair], a)
            treated = variant == index
            if treated.any():
                arms.slo.update(outcomes["slow"][treated])

    def add_first_errors(self, users: Sequence[UserOutcome]) -> None:
        """Users' first errors, in the order they happened."""
        if not users:
            return
        variant = np.fromiter((u.variant for u in users), dtype=np.int64, count=len(users))
        for index, arms in self.arms.items():
            pair = (variant == 0) | (variant == index)
            if pair.any():
                arms.first_errors.update((variant[pair] == index).astype(np.int64))

    def look_at_ratio(self, exposures: dict[int, int]) -> None:
        """Sequential SRM on the users seen per analysed arm (all of them, closed or not)."""
        counts = [exposures.get(v.index, 0) for v in self.experiment.variants]
        self.srm.look(counts)

    # -- deciding -----------------------------------------------------------------------------

    def comparisons(self) -> list[Comparison]:
        result = []
        for index, arms in sorted(self.arms.items()):
            variant = self.experiment.variants[index]
            fired, over = self._guardrails(arms)
            p = arms.primary
            result.append(
                Comparison(
                    candidate=index,
                    version=variant.version,
                    users=(p.n_control, p.n_treatment),
                    primary=(p.estimate, p.lower, p.upper),
                    fired=tuple(fired),
                    over_margin=tuple(over),
                )
            )
        return result

    def _guardrails(self, arms: _Arms) -> tuple[list[str], list[str]]:
        fired, over = [], []
        guards = self.config.guardrails
        if "errors" in guards:
            margin = guards["errors"]
            if arms.first_errors.fired(self.alpha):
                fired.append(
                    f"errors: first errors lean to the candidate ({arms.first_errors.treatment} "
                    f"of {arms.first_errors.n}; e-value {np.exp(min(arms.first_errors.max_log_e, 700)):.3g}"
                    f" >= {1 / self.alpha:.3g})"
                )
            elif arms.errors.lower > margin:
                fired.append(f"errors: rate up by at least {arms.errors.lower:.4f} > {margin}")
            if arms.errors.upper >= margin:
                over.append(f"errors upper bound {arms.errors.upper:+.4f} >= {margin}")
        if "latency-p95" in guards:
            margin = guards["latency-p95"]
            x0 = self.config.latency_slo_ms
            if arms.slow.lower > margin:
                fired.append(
                    f"latency-p95: share of requests over {x0:g} ms up by at least "
                    f"{arms.slow.lower:.4f} > {margin}"
                )
            elif arms.slo.lower > self.config.slo_share:
                fired.append(
                    f"latency-p95: at least {arms.slo.lower:.1%} of the candidate's requests are "
                    f"over {x0:g} ms (SLO: {self.config.slo_share:.0%})"
                )
            if arms.slow.upper >= margin:
                over.append(f"latency-p95 upper bound {arms.slow.upper:+.4f} >= {margin}")
        return fired, over

    def decide(self, now: datetime) -> Decision:
        e = self.experiment
        progress = Progress(
            now=now, created_at=e.created_at, step=e.step, steps=len(e.ramp or (0,)),
            step_started_at=e.step_started_at, share=treatment_share(e),
        )  # fmt: skip
        return decide(
            self.config,
            progress,
            self.comparisons(),
            srm_fired=self.srm.fired(self.config.srm_threshold),
            srm_p=self.srm.p_value,
            exposures=sum(self.srm.counts),
        )

    def statistics(self) -> dict[str, Any]:
        """What an alias event and `ab status` show."""
        out: dict[str, Any] = {
            "srm": {"counts": list(self.srm.counts), "p_value": self.srm.p_value},
            "alpha": self.alpha,
            "comparisons": {},
        }
        for c in self.comparisons():
            arms = self.arms[c.candidate]
            out["comparisons"][str(c.candidate)] = {
                "version": c.version,
                "users": {"control": c.users[0], "candidate": c.users[1]},
                "primary": _cs_json(arms.primary),
                "errors": _cs_json(arms.errors),
                "slow": _cs_json(arms.slow),
                "slo_lower": arms.slo.lower,
                "first_errors": {
                    "n": arms.first_errors.n,
                    "candidate": arms.first_errors.treatment,
                    "log_e": arms.first_errors.max_log_e,
                },
                "fired": list(c.fired),
            }
        return out

    def remember(self, now: datetime) -> None:
        """A point of the confidence sequences over time (for `ab status --plot`)."""
        point = {
            "at": now.isoformat(),
            "step": self.experiment.step,
            "share": treatment_share(self.experiment),
            "exposures": list(self.srm.counts),
            "comparisons": {
                str(i): {
                    "estimate": a.primary.estimate, "lower": a.primary.lower,
                    "upper": a.primary.upper, "n": a.primary.n,
                    "errors_upper": a.errors.upper, "slow_upper": a.slow.upper,
                }
                for i, a in self.arms.items()
            },
        }  # fmt: skip
        last = self.history[-1] if self.history else None
        if (
            last
            and last["exposures"] == point["exposures"]
            and last["step"] == point["step"]
            and (last["comparisons"] == point["comparisons"])
        ):
            return
        self.history.append(point)
        if len(self.history) > _HISTORY_POINTS:  # thin the older half, keep the recent detail
            half = len(self.history) // 2
            self.history = self.history[:half:2] + self.history[half:]


def finite(value: Any) -> Any:
    """`value` with non-finite floats as None: JSON columns (PostgreSQL's) refuse NaN and inf."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _cs_json(cs: DifferenceCS) -> dict[str, float]:
    return {
        "estimate": cs.estimate,
        "lower": cs.lower,
        "upper": cs.upper,
        "candidate_mean": cs.mean_treatment,
        "control_mean": cs.mean_control,
    }


@dataclass(frozen=True, slots=True)
class PassResult:
    experiment_id: int
    decision: Decision
    acted: str | None  # "advance", "promote", "rollback", "stop" when this pass acted
    statistics: dict[str, Any]


def analyse(
    store: ExperimentStore, experiment_id: int, *, now: datetime | None = None, actor: str = ACTOR
) -> PassResult | None:
    """One pass (blocking: run it in a worker thread). None when another replica holds the
    experiment or it is no longer running."""
    with store.analysis(experiment_id) as tx:
        if tx is None:
            return None
        return _analyse(tx, now or datetime.now(UTC), actor=actor)


def _analyse(tx: AnalysisTx, now: datetime, *, actor: str) -> PassResult:
    experiment = tx.experiment
    config = ExperimentConfig(**experiment.config)
    analysis = Analysis(experiment, config)
    closed_before = now - timedelta(seconds=config.window_seconds)
    while True:
        users = tx.closed_users(closed_before=closed_before, limit=_BATCH_USERS)
        analysis.add_users(users)
        tx.mark_analysed([u.user_hash for u in users])
        if len(users) < _BATCH_USERS:
            break
    while True:
        errors = tx.new_first_errors(limit=_BATCH_USERS)
        analysis.add_first_errors(errors)
        tx.mark_errors_counted([u.user_hash for u in errors])
        if len(errors) < _BATCH_USERS:
            break
    analysis.look_at_ratio(tx.exposure_counts())
    decision = analysis.decide(now)
    analysis.remember(now)
    statistics = finite(analysis.statistics())
    record = {**decision.to_json(), "at": now.isoformat(), "statistics": statistics}
    tx.save(analysis=analysis.to_state(), decision=record)
    acted = _act(tx, experiment, config, decision, statistics, actor=actor)
    return PassResult(experiment.id, decision, acted, statistics)


def _act(
    tx: AnalysisTx,
    experiment: ExperimentRecord,
    config: ExperimentConfig,
    decision: Decision,
    statistics: dict[str, Any],
    *,
    actor: str,
) -> str | None:
    details = {
        "experiment": experiment.id,
        "decision": decision.action,
        "reason": decision.reason,
        "statistics": statistics,
        "config": config.to_json(),
    }
    if decision.action == ADVANCE:
        to = experiment.step + 1
        share = experiment.ramp[to] if experiment.ramp else None
        tx.advance(to, actor=actor, reason=f"{decision.reason}; now {share:g} %", details=details)
        return ADVANCE
    if not config.auto:
        return None
    reason = f"experiment {experiment.id}: {decision.reason}"
    if decision.action == PROMOTE:
        winner = experiment.variants[decision.candidate]
        tx.end(status="promoted", actor=actor, reason=reason, details=details,
               to_version=winner.version)  # fmt: skip
        return PROMOTE
    if decision.action == ROLLBACK:
        tx.end(status="rolled_back", actor=actor, reason=reason, details=details,
               to_version=experiment.control.version)  # fmt: skip
        return ROLLBACK
    if decision.action == STOP:
        tx.end(status="stopped", actor=actor, reason=reason, details=details)
        return STOP
    return None
