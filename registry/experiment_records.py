"""What the registry hands out about A/B experiments: frozen values detached from the database
session (the experiment, its events, per-user outcomes, per-variant totals, a rating, replica
states), the deltas servers record in batches and how deltas combine, and the rules an
experiment plan must follow. Nothing here queries or writes anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from registry.errors import InvalidExperimentError

RUNNING = "running"
ENDED_STATUSES = ("promoted", "rolled_back", "stopped")
CONTROL, CANDIDATE = "control", "candidate"
MAX_RAMP_PERCENT = 50.0  # the analysed slice is 1:1, so the treatment share tops out at half


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True, slots=True)
class VariantSpec:
    """A version to serve in a new experiment and its traffic weight (any positive number)."""

    version: int
    weight: float


@dataclass(frozen=True, slots=True)
class Variant:
    """One arm: index 0 is the control, the others are candidates."""

    index: int
    version: int
    weight: float
    role: str

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "version": self.version,
            "weight": self.weight,
            "role": self.role,
        }


@dataclass(frozen=True, slots=True)
class ExperimentRecord:
    """An experiment on adapter `name`, running or ended.

    `salt` and `hash_version` fix the user -> bucket assignment; `ramp` lists the treatment
    share (percent) of each step and `step` indexes it. `analysis` and `decision` hold what the
    last decision pass computed (the procedures' state) and concluded.
    """

    id: int
    name: str
    status: str
    salt: str
    hash_version: int
    variants: tuple[Variant, ...]
    ramp: tuple[float, ...] | None
    step: int
    step_started_at: datetime
    config: Mapping[str, Any]
    analysis: Mapping[str, Any]
    decision: Mapping[str, Any]
    analysed_at: datetime | None
    created_at: datetime
    created_by: str
    ended_at: datetime | None
    ended_by: str | None
    end_reason: str | None

    @property
    def control(self) -> Variant:
        return self.variants[0]

    @property
    def running(self) -> bool:
        return self.status == RUNNING

    def variant(self, version: int) -> Variant:
        """The arm serving `version`; KeyError if the experiment has none."""
        for variant in self.variants:
            if variant.version == version:
                return variant
        raise KeyError(f"experiment {self.id} has no variant serving {self.name}@{version}")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "running": self.running,
            "salt": self.salt,
            "hash_version": self.hash_version,
            "variants": [v.to_json() for v in self.variants],
            "ramp": list(self.ramp) if self.ramp is not None else None,
            "step": self.step,
            "step_started_at": self.step_started_at.isoformat(),
            "config": dict(self.config),
            "analysis": dict(self.analysis),
            "decision": dict(self.decision),
            "analysed_at": _iso(self.analysed_at),
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "ended_at": _iso(self.ended_at),
            "ended_by": self.ended_by,
            "end_reason": self.end_reason,
        }


@dataclass(frozen=True, slots=True)
class ExperimentEvent:
    """One entry of an experiment's log: kind "start", "advance" or "end"."""

    id: int
    experiment_id: int
    kind: str
    step: int
    actor: str
    reason: str
    details: Mapping[str, Any]
    at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "experiment_id": self.experiment_id,
            "kind": self.kind,
            "step": self.step,
            "actor": self.actor,
            "reason": self.reason,
            "details": dict(self.details),
            "at": self.at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class UserDelta:
    """What one analysed-slice user did since the last flush (counts add up across flushes)."""

    experiment_id: int
    user_hash: str
    variant: int
    first_seen_at: datetime
    requests: int = 0
    errors: int = 0
    slow: int = 0
    output_tokens: int = 0
    first_error_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CounterDelta:
    """What one variant served since the last flush, every request included."""

    experiment_id: int
    variant: int
    requests: int = 0
    errors: int = 0
    slow: int = 0
    output_tokens: int = 0
    latency_seconds_sum: float = 0.0
    ttft_seconds_sum: float = 0.0
    unkeyed_requests: int = 0
    unanalysed_requests: int = 0


COUNTER_FIELDS = tuple(f for f in CounterDelta.__slots__ if f not in ("experiment_id", "variant"))


@dataclass(frozen=True, slots=True)
class CompletionDelta:
    """A completion served inside an experiment, so feedback on it can find its variant."""

    completion_id: str
    experiment_id: int
    variant: int
    user_hash: str | None
    analysed: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class UserOutcome:
    """One user's aggregates as the decision pass reads them."""

    user_hash: str
    variant: int
    first_seen_at: datetime
    requests: int
    errors: int
    slow: int
    output_tokens: int
    feedback_sum: float
    feedback_count: int
    first_error_at: datetime | None


@dataclass(frozen=True, slots=True)
class VariantTotals:
    """Everything one variant served; `users` counts the analysed-slice users seen."""

    variant: int
    requests: int = 0
    errors: int = 0
    slow: int = 0
    output_tokens: int = 0
    latency_seconds_sum: float = 0.0
    ttft_seconds_sum: float = 0.0
    unkeyed_requests: int = 0
    unanalysed_requests: int = 0
    feedback_count: int = 0
    feedback_sum: float = 0.0
    users: int = 0

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class Rating:
    """A feedback score joined to the variant that served the completion; `duplicate` when the
    completion was rated before (then `score` is that first score and nothing changed)."""

    completion_id: str
    experiment_id: int
    name: str
    variant: int
    version: int
    score: float
    duplicate: bool
    analysed: bool

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """What a serving replica last reported about an experiment."""

    replica_id: str
    state: str
    reason: str
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "state": self.state,
            "reason": self.reason,
            "updated_at": self.updated_at.isoformat(),
        }


def plan_problems(
    variants: Sequence[VariantSpec], ramp: Sequence[float] | None, config: Mapping[str, Any]
) -> list[str]:
    """Every rule a new experiment's plan breaks (empty when it is fine)."""
    problems: list[str] = []
    if len(variants) < 2:
        problems.append(f"an experiment needs at least 2 variants, got {len(variants)}")
    versions = [v.version for v in variants]
    repeated = sorted({v for v in versions if versions.count(v) > 1})
    if repeated:
        problems.append(f"each variant needs its own version; repeated: {_join(repeated)}")
    for spec in variants:
        if isinstance(spec.version, bool) or not isinstance(spec.version, int) or spec.version < 1:
            problems.append(f"versions start at 1, got {spec.version!r}")
        if not _finite(spec.weight) or spec.weight <= 0:
            problems.append(f"version {spec.version}: weight must be > 0, got {spec.weight!r}")
    if ramp is not None:
        problems += ramp_problems(ramp)
    try:
        json.dumps(dict(config), allow_nan=False)
    except (TypeError, ValueError) as e:
        problems.append(f"config must be plain JSON: {e}")
    return problems


def ramp_problems(ramp: Sequence[float]) -> list[str]:
    problems: list[str] = []
    if not ramp:
        problems.append("a ramp needs at least one step (or none at all)")
    outside = [p for p in ramp if not _finite(p) or not 0 < p <= MAX_RAMP_PERCENT]
    if outside:
        problems.append(
            f"ramp steps are treatment shares in (0, {MAX_RAMP_PERCENT:g}] percent; "
            f"outside: {_join(outside)}"
        )
    elif any(b <= a for a, b in zip(ramp, ramp[1:], strict=False)):
        problems.append(f"ramp steps must strictly increase, got {_join(ramp)}")
    return problems


def merge_users(deltas: Sequence[UserDelta]) -> list[UserDelta]:
    """One delta per (experiment, user), sorted by that key: counts add up, the first exposure
    and first error are the earliest given, the variant is the first one given."""
    merged: dict[tuple[int, str], UserDelta] = {}
    for d in deltas:
        _check_key("user hash", d.user_hash, 32)
        key = (d.experiment_id, d.user_hash)
        seen = merged.get(key)
        if seen is None:
            merged[key] = d
            continue
        errors = [t for t in (seen.first_error_at, d.first_error_at) if t is not None]
        merged[key] = replace(
            seen,
            first_seen_at=min(seen.first_seen_at, d.first_seen_at),
            requests=seen.requests + d.requests,
            errors=seen.errors + d.errors,
            slow=seen.slow + d.slow,
            output_tokens=seen.output_tokens + d.output_tokens,
            first_error_at=min(errors, default=None),
        )
    return [merged[key] for key in sorted(merged)]


def merge_counters(deltas: Sequence[CounterDelta]) -> list[CounterDelta]:
    """One delta per (experiment, variant), sorted by that key, every field summed."""
    merged: dict[tuple[int, int], CounterDelta] = {}
    for d in deltas:
        key = (d.experiment_id, d.variant)
        seen = merged.get(key)
        merged[key] = (
            d
            if seen is None
            else replace(seen, **{f: getattr(seen, f) + getattr(d, f) for f in COUNTER_FIELDS})
        )
    return [merged[key] for key in sorted(merged)]


def merge_completions(deltas: Sequence[CompletionDelta]) -> list[CompletionDelta]:
    """One delta per completion id (the first given), sorted by it."""
    merged: dict[str, CompletionDelta] = {}
    for d in deltas:
        _check_key("completion id", d.completion_id, 64)
        if d.user_hash is not None:
            _check_key("user hash", d.user_hash, 32)
        merged.setdefault(d.completion_id, d)
    return [merged[key] for key in sorted(merged)]


def _check_key(label: str, value: object, limit: int) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise InvalidExperimentError([f"a {label} is 1-{limit} characters, got {value!r:.80}"])


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _join(values: Sequence[object]) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
