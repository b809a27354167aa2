"""The experiment commands, shared by `loraplex ab` and the admin API: start, stop, status, list.

Each validates everything it is given and reports every problem at once (ValueError for the
plan, the registry's errors for what the database says), then makes one registry call, so a
refused command writes nothing. Status reads what replicas recorded and the last analysis pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from registry.experiment_records import ExperimentRecord, ReplicaState, VariantSpec
from registry.experiments import ExperimentStore
from registry.records import AliasMove
from registry.refs import DEFAULT_ALIAS
from server.ab.assignment import treatment_share
from server.ab.config import DEFAULT_RAMP, ExperimentConfig

MANUAL = "manual"
# A serving replica reports its state on every change and at least this often; one silent for
# STALE_REPLICA_SECONDS is presumed gone (killed, scaled down) and marked so in the status.
REPORT_EVERY_SECONDS = 30.0
STALE_REPLICA_SECONDS = 3 * REPORT_EVERY_SECONDS


class PlanError(ValueError):
    """An experiment plan that cannot start; the message lists every problem."""


def build_plan(
    *,
    control: int | None,
    candidate: int | None,
    variants: Sequence[tuple[int, float]] = (),
    ramp: Sequence[float] | None = None,
    config: dict[str, Any] | None = None,
) -> tuple[list[VariantSpec], tuple[float, ...] | None, ExperimentConfig]:
    """(variants, ramp, config) from what a user gave, or PlanError listing every problem.

    Either --control/--candidate (a ramp; DEFAULT_RAMP unless given) or --variant V=W ... (a
    static weighted split, the first is the control; no ramp)."""
    problems: list[str] = []
    specs: list[VariantSpec] = []
    if variants and (control is not None or candidate is not None):
        problems.append("give either --control and --candidate, or --variant ..., not both")
    elif variants:
        if ramp is not None:
            problems.append("--ramp works with --control/--candidate (two arms), not --variant")
        specs = [VariantSpec(version=v, weight=w) for v, w in variants]
    elif control is None or candidate is None:
        problems.append("give --control VERSION and --candidate VERSION (or --variant V=W ...)")
    else:
        specs = [VariantSpec(control, 1.0), VariantSpec(candidate, 1.0)]
        ramp = tuple(ramp) if ramp is not None else DEFAULT_RAMP
    try:
        parsed = ExperimentConfig(**(config or {}))
    except ValidationError as e:
        parsed = None
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "config"
            problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    if problems:
        raise PlanError("; ".join(problems))
    return specs, (tuple(ramp) if ramp is not None else None), parsed


def start(
    store: ExperimentStore,
    name: str,
    *,
    control: int | None = None,
    candidate: int | None = None,
    variants: Sequence[tuple[int, float]] = (),
    ramp: Sequence[float] | None = None,
    config: dict[str, Any] | None = None,
    actor: str,
    reason: str = "",
) -> ExperimentRecord:
    specs, ramp, parsed = build_plan(
        control=control, candidate=candidate, variants=variants, ramp=ramp, config=config
    )
    return store.start(
        name, variants=specs, ramp=ramp, config=parsed.to_json(), actor=actor, reason=reason
    )


def stop(
    store: ExperimentStore,
    name: str,
    *,
    promote: int | None = None,
    rollback: bool = False,
    actor: str,
    reason: str = "",
) -> tuple[ExperimentRecord, AliasMove | None]:
    """End NAME's running experiment: promote a variant, roll back to the control, or (neither)
    stop and leave the production alias where it is."""
    if promote is not None and rollback:
        raise PlanError("give --promote VERSION or --rollback, not both")
    experiment = store.running(name)
    if experiment is None:
        latest = _latest_or_none(store, name)
        ended = f" (the last one, {latest.id}, is {latest.status})" if latest else ""
        raise PlanError(f"{name} has no running experiment{ended}")
    details = {
        "experiment": experiment.id,
        "decision": MANUAL,
        "statistics": experiment.decision.get("statistics", {}),
    }
    why = reason or "stopped by hand"
    if promote is not None:
        try:
            experiment.variant(promote)
        except KeyError:
            versions = ", ".join(str(v.version) for v in experiment.variants)
            raise PlanError(
                f"{name}@{promote} is not a variant of experiment {experiment.id} "
                f"(variants: {versions})"
            ) from None
        details["decision"] = "promote"
        return store.end(experiment.id, status="promoted", actor=actor, details=details,
                         reason=f"experiment {experiment.id}: {why}", to_version=promote)  # fmt: skip
    if rollback:
        details["decision"] = "rollback"
        return store.end(experiment.id, status="rolled_back", actor=actor, details=details,
                         reason=f"experiment {experiment.id}: {why}",
                         to_version=experiment.control.version)  # fmt: skip
    details["decision"] = "stop"
    return store.end(experiment.id, status="stopped", actor=actor, details=details,
                     reason=f"experiment {experiment.id}: {why}")  # fmt: skip


def _replica_json(replica: ReplicaState, now: datetime) -> dict:
    silent = max(0.0, (now - replica.updated_at).total_seconds())
    return replica.to_json() | {
        "reported_seconds_ago": silent,
        "stale": silent > STALE_REPLICA_SECONDS,
    }


def _latest_or_none(store: ExperimentStore, name: str) -> ExperimentRecord | None:
    from registry.errors import NotFoundError

    try:
        return store.latest(name)
    except NotFoundError:
        return None


def status(store: ExperimentStore, name: str, *, experiment_id: int | None = None) -> dict:
    """The newest experiment on NAME (or `experiment_id`): plan, traffic per variant, the
    statistics and recommendation of the last analysis pass, replicas, events."""
    experiment = store.get(experiment_id) if experiment_id else store.latest(name)
    totals = store.totals(experiment.id)
    exposures = store.exposure_counts(experiment.id)
    variants = []
    for v in experiment.variants:
        t = totals.get(v.index)
        requests = t.requests if t else 0
        variants.append({
            **v.to_json(),
            "model": f"{experiment.name}@{v.version}",
            "users": exposures.get(v.index, 0),
            "requests": requests,
            "errors": t.errors if t else 0,
            "error_rate": (t.errors / requests) if requests else None,
            "slow_rate": (t.slow / requests) if requests else None,
            "mean_latency_s": (t.latency_seconds_sum / requests) if requests else None,
            "mean_ttft_s": (t.ttft_seconds_sum / requests) if requests else None,
            "output_tokens": t.output_tokens if t else 0,
            "unkeyed_requests": t.unkeyed_requests if t else 0,
            "unanalysed_requests": t.unanalysed_requests if t else 0,
            "feedback": t.feedback_count if t else 0,
            "feedback_rate": (t.feedback_count / requests) if requests else None,
            "mean_feedback": (t.feedback_sum / t.feedback_count) if t and t.feedback_count else None,
        })  # fmt: skip
    share = treatment_share(experiment)
    now = datetime.now(UTC)
    return {
        "experiment": {k: v for k, v in experiment.to_json().items() if k != "analysis"},
        "share": share,
        "step": {
            "index": experiment.step,
            "of": len(experiment.ramp or (0,)),
            "share_percent": share * 100 if share is not None else None,
        },  # fmt: skip
        "variants": variants,
        "recommendation": dict(experiment.decision) or None,
        "analysed_seconds_ago": (
            (now - experiment.analysed_at).total_seconds() if experiment.analysed_at else None
        ),
        "history": list((experiment.analysis or {}).get("history", [])),
        "replicas": [_replica_json(r, now) for r in store.replicas(experiment.id)],
        "events": [e.to_json() for e in store.events(experiment.id)],
        "alias": DEFAULT_ALIAS,
    }
