"""The decision rules of an experiment, as a pure function of its pre-registered config, where the
ramp stands and the statistics so far (AB-STATS.md, "Decision rules and defaults").

In order: roll back when a guardrail fires or the primary is significantly worse; hold (freeze
the ramp, no promotion) on a sample-ratio mismatch or too few users; at the last step promote
when the primary is significantly better (and every guardrail is within its margin) after the
minimum time; before it, advance once the step's dwell and minimum users are met; at the
timeout keep the control (or promote a non-inferior candidate, if so configured).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from server.ab.config import ExperimentConfig

CONTINUE, HOLD, ADVANCE, PROMOTE, ROLLBACK, STOP = (
    "continue", "hold", "advance", "promote", "rollback", "stop",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Comparison:
    """One candidate against the control: bounds are on candidate minus control."""

    candidate: int  # variant index
    version: int
    users: tuple[int, int]  # closed windows: (control, candidate)
    primary: tuple[float, float, float]  # (estimate, lower, upper)
    fired: tuple[str, ...] = ()  # guardrails that fired, with why
    over_margin: tuple[str, ...] = ()  # guardrails whose upper bound is not yet below the margin


@dataclass(frozen=True, slots=True)
class Decision:
    action: str
    reason: str
    candidate: int | None = None  # the variant index acted on (promote / rollback)
    checks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Progress:
    """Where the experiment stands in time and on its ramp."""

    now: datetime
    created_at: datetime
    step: int
    steps: int  # 1 without a ramp
    step_started_at: datetime
    share: float | None  # the candidate's traffic share at this step (None: weighted variants)

    @property
    def last_step(self) -> bool:
        return self.step >= self.steps - 1

    @property
    def in_step(self) -> float:
        return (self.now - self.step_started_at).total_seconds()

    @property
    def running(self) -> float:
        return (self.now - self.created_at).total_seconds()


def decide(
    config: ExperimentConfig,
    progress: Progress,
    comparisons: list[Comparison],
    *,
    srm_fired: bool,
    srm_p: float,
    exposures: int,
) -> Decision:
    checks = [f"sample ratio p = {srm_p:.3g} (threshold {config.srm_threshold})"]
    for c in comparisons:
        est, lo, hi = c.primary
        checks.append(
            f"variant {c.candidate} (v{c.version}) {config.primary}: {est:+.4f} "
            f"[{lo:+.4f}, {hi:+.4f}] on {c.users[1]} vs {c.users[0]} users"
        )
    for c in comparisons:  # 1. harm
        if c.fired:
            return Decision(ROLLBACK, f"v{c.version}: {'; '.join(c.fired)}", c.candidate, checks)
        if c.primary[2] < -config.harm_margin:
            return Decision(
                ROLLBACK,
                f"v{c.version} is significantly worse on {config.primary}: upper bound "
                f"{c.primary[2]:+.4f} < {-config.harm_margin:+.4f}",
                c.candidate,
                checks,
            )
    if srm_fired:  # 2. health
        return Decision(
            HOLD,
            f"sample ratio mismatch (p = {srm_p:.3g} < {config.srm_threshold}): the split is "
            "not what was configured; the ramp is frozen and nothing is promoted",
            None,
            checks,
        )
    if exposures == 0:
        return Decision(HOLD, "no traffic from users with a key yet", None, checks)
    need = config.min_users_per_arm
    short = [c for c in comparisons if min(c.users) < need]
    timed_out = progress.running >= config.max_runtime_seconds
    if timed_out:
        return _at_timeout(config, comparisons, checks)
    if short:
        c = short[0]
        return Decision(
            HOLD,
            f"too few users with closed windows: {c.users[1]} (v{c.version}) and {c.users[0]} "
            f"(control); {need} per arm needed",
            None,
            checks,
        )
    if not progress.last_step:  # 3. ramp
        if progress.in_step < config.dwell_seconds:
            left = config.dwell_seconds - progress.in_step
            return Decision(CONTINUE, f"step {progress.step + 1}/{progress.steps}: "
                            f"{left:.0f} s of its dwell left", None, checks)  # fmt: skip
        return Decision(
            ADVANCE,
            f"step {progress.step + 1}/{progress.steps} ran its dwell with {need}+ users per arm "
            "and no guardrail fired",
            None,
            checks,
        )
    if progress.in_step < config.final_dwell_seconds:  # 4. promotion
        left = config.final_dwell_seconds - progress.in_step
        return Decision(CONTINUE, f"last step: {left:.0f} s of its minimum time left", None, checks)
    winners = [c for c in comparisons if c.primary[1] > config.promote_margin and not c.over_margin]
    if winners:
        best = max(winners, key=lambda c: c.primary[1])
        return Decision(
            PROMOTE,
            f"v{best.version} is significantly better on {config.primary}: lower bound "
            f"{best.primary[1]:+.4f} > {config.promote_margin:+.4f}, guardrails within margins",
            best.candidate,
            checks,
        )
    waiting = [c for c in comparisons if c.primary[1] > config.promote_margin and c.over_margin]
    if waiting:
        c = waiting[0]
        return Decision(CONTINUE, f"v{c.version} is better, but guardrails are not yet shown "
                        f"within their margins: {'; '.join(c.over_margin)}", None, checks)  # fmt: skip
    return Decision(CONTINUE, "no significant difference yet", None, checks)


def _at_timeout(config: ExperimentConfig, comparisons: list[Comparison], checks: list[str]):
    if config.promote_if_noninferior:
        ok = [
            c
            for c in comparisons
            if c.primary[1] > -config.noninferiority_margin and not c.over_margin
            and min(c.users) >= config.min_users_per_arm
        ]  # fmt: skip
        if ok:
            best = max(ok, key=lambda c: c.primary[1])
            return Decision(
                PROMOTE,
                f"timeout: v{best.version} is non-inferior (lower bound {best.primary[1]:+.4f} > "
                f"{-config.noninferiority_margin:+.4f})",
                best.candidate,
                checks,
            )
    return Decision(STOP, "timeout without a significant result: keep the control", None, checks)
