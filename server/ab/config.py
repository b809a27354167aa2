"""What an experiment pre-registers when it starts: primary metric, guardrails and their margins,
alpha, windows, dwell times, minimum users, promotion rules. Frozen into the experiment's row and
never retuned mid-run (AB-STATS.md, design choice 5). Defaults follow AB-STATS.md's decision
rules (GrowthBook / LaunchDarkly-style safe rollouts).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_RAMP = (1.0, 5.0, 10.0, 25.0, 50.0)
PRIMARY_METRICS = ("feedback",)
# guardrail -> default margin: the largest tolerated increase, in the metric's own unit
GUARDRAILS = {"errors": 0.02, "latency-p95": 0.05}


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    primary: str = Field(default="feedback", description="the metric promotion is decided on")
    guardrails: dict[str, float] = Field(
        default_factory=lambda: dict(GUARDRAILS),
        description="guardrail -> margin; a guardrail fires when the candidate is worse by more",
    )
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    srm_threshold: float = Field(default=0.001, gt=0, lt=0.5)
    window_seconds: float = Field(
        default=3600.0, gt=0, description="each user's observation: [first exposure, + window]"
    )
    dwell_seconds: float = Field(default=1800.0, ge=0, description="minimum time per ramp step")
    final_dwell_seconds: float = Field(
        default=7200.0, ge=0, description="minimum time at the last step before promotion"
    )
    min_users_per_arm: int = Field(default=100, ge=1, description="closed windows per arm")
    promote_margin: float = Field(
        default=0.0, ge=0, description="promote when the primary's lower bound exceeds this"
    )
    harm_margin: float = Field(
        default=0.0, ge=0, description="roll back when the primary's upper bound is below -this"
    )
    max_runtime_seconds: float = Field(default=7 * 86400.0, gt=0)
    promote_if_noninferior: bool = Field(
        default=False, description="at timeout, promote if the primary is not worse by more "
        "than noninferiority_margin (a safe-rollout release); else keep the control",
    )  # fmt: skip
    noninferiority_margin: float = Field(default=0.02, ge=0)
    neutral_feedback: float = Field(
        default=0.5, ge=0, le=1, description="a user's feedback outcome when they rated nothing"
    )
    latency_slo_ms: float = Field(
        default=10_000.0, gt=0,
        description="x0 of the latency guardrail: a request slower than this is 'slow'",
    )  # fmt: skip
    slo_share: float = Field(
        default=0.05, gt=0, lt=1, description="the SLO: at most this share of requests slow"
    )
    auto: bool = Field(default=False, description="act on decisions (promote, roll back)")

    @field_validator("primary")
    @classmethod
    def _known_primary(cls, value: str) -> str:
        if value not in PRIMARY_METRICS:
            raise ValueError(
                f"unknown primary metric {value!r}; known: {', '.join(PRIMARY_METRICS)}"
            )
        return value

    @field_validator("guardrails")
    @classmethod
    def _known_guardrails(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(GUARDRAILS))
        if unknown:
            raise ValueError(
                f"unknown guardrail(s) {', '.join(unknown)}; known: {', '.join(GUARDRAILS)}"
            )
        bad = sorted(k for k, margin in value.items() if not 0 <= margin <= 1)
        if bad:
            raise ValueError(f"guardrail margins must be in [0, 1]: {', '.join(bad)}")
        return value

    @model_validator(mode="after")
    def _window_fits(self) -> ExperimentConfig:
        if self.window_seconds > self.max_runtime_seconds:
            raise ValueError("window_seconds must not exceed max_runtime_seconds")
        return self

    def to_json(self) -> dict[str, Any]:
        return self.model_dump()


def parse_guardrails(values: list[str]) -> dict[str, float]:
    """`errors`, `latency-p95=0.1` -> {name: margin}; the default margin when none is given."""
    result: dict[str, float] = {}
    problems = []
    for value in values:
        name, sep, margin = value.partition("=")
        name = name.strip()
        if name not in GUARDRAILS:
            problems.append(f"unknown guardrail {name!r} (known: {', '.join(GUARDRAILS)})")
            continue
        try:
            result[name] = float(margin) if sep else GUARDRAILS[name]
        except ValueError:
            problems.append(f"guardrail {name}: margin {margin!r} is not a number")
    if problems:
        raise ValueError("; ".join(problems))
    return result


def parse_ramp(value: str) -> tuple[float, ...]:
    """`1,5,10,25,50` -> treatment shares in percent, strictly increasing, each in (0, 50]."""
    try:
        steps = tuple(float(p) for p in value.split(",") if p.strip())
    except ValueError as e:
        raise ValueError(f"--ramp must be comma-separated percentages, got {value!r}") from e
    if not steps:
        raise ValueError("--ramp needs at least one step")
    if any(not 0 < s <= 50 for s in steps) or any(
        b <= a for a, b in zip(steps, steps[1:], strict=False)
    ):
        raise ValueError(
            f"--ramp steps must increase strictly within (0, 50] (the candidate's share of "
            f"traffic; 50 means an even split), got {value!r}"
        )
    return steps


def parse_variants(values: list[str]) -> list[tuple[int, float]]:
    """`3=50`, `4=50` -> [(3, 50.0), (4, 50.0)]; the first is the control."""
    result, problems = [], []
    for value in values:
        version, sep, weight = value.partition("=")
        try:
            number, share = int(version), float(weight) if sep else 1.0
        except ValueError:
            problems.append(f"--variant {value!r}: expected VERSION=WEIGHT, e.g. 3=50")
            continue
        if number < 1 or share <= 0:
            problems.append(f"--variant {value!r}: the version must be >= 1 and the weight > 0")
            continue
        result.append((number, share))
    if problems:
        raise ValueError("; ".join(problems))
    return result
