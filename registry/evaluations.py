"""Evaluations of adapter versions: append-only rows beside the immutable version they judge.

A version never changes, so each evaluation (its baseline, the dataset's sha256 and a JSON
document of metrics) is a row of its own, part of the version's lineage and readable by
promotion rules. Writing one does not bump the registry revision: servers route nothing by it.
This module stores and reads; computing the metrics is the trainer's (trainer/evaluate.py).
"""

from __future__ import annotations

import builtins
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, select

from registry import queries
from registry.errors import RegistryUserError
from registry.refs import check_actor, check_version
from registry.store import RegistryStore, lock_adapter
from registry.tables import EvaluationRow, utc_now

MAX_BASELINE_CHARS = 128  # the baseline column's width
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Metrics `summary_line` shows, in this order, when the document has them.
SUMMARY_METRICS = ("loss", "exact_match", "contains", "token_f1", "rouge_l")


class InvalidEvaluationError(RegistryUserError):
    """An evaluation that cannot be stored as given (bad baseline, hash or metrics)."""


@dataclass(frozen=True, slots=True)
class EvaluationRecord:
    """One stored evaluation of `name@version` against `baseline` ("base" or NAME@V)."""

    id: int
    name: str
    version: int
    baseline: str
    dataset_sha256: str
    metrics: Mapping[str, Any]
    created_at: datetime
    created_by: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ref": self.ref,
            "baseline": self.baseline,
            "dataset_sha256": self.dataset_sha256,
            "metrics": dict(self.metrics),
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
        }


class EvaluationStore:
    """Evaluations on `engine`, through the same session helpers as RegistryStore."""

    def __init__(self, engine: Engine, *, sessions: RegistryStore | None = None) -> None:
        self.engine = engine
        self._sessions = sessions if sessions is not None else RegistryStore(engine)

    def add(
        self,
        name: str,
        version: int,
        *,
        baseline: str,
        dataset_sha256: str,
        metrics: Mapping[str, Any],
        actor: str,
    ) -> EvaluationRecord:
        """Append an evaluation of `name@version` (which must exist); the revision stays."""
        check_version(version)
        check_actor(actor)
        problems = evaluation_problems(baseline, dataset_sha256, metrics)
        if problems:
            raise InvalidEvaluationError(
                f"evaluation of {name}@{version} refused: " + "; ".join(problems)
            )
        with self._sessions.write() as session:
            adapter = lock_adapter(session, name)
            queries.require_version(session, adapter, version)
            row = EvaluationRow(
                adapter_id=adapter.id,
                version=version,
                baseline=baseline,
                dataset_sha256=dataset_sha256,
                metrics=json.loads(json.dumps(dict(metrics))),
                created_at=utc_now(),
                created_by=actor,
            )
            session.add(row)
            session.flush()
            return _record(adapter.name, row)

    def list(self, name: str, version: int) -> builtins.list[EvaluationRecord]:
        """Every evaluation of `name@version`, oldest first (an unknown version raises)."""
        check_version(version)
        with self._sessions.read() as session:
            return _rows(session, name, version)

    def latest(self, name: str, version: int) -> EvaluationRecord | None:
        """The newest evaluation of `name@version`, or None when it has none."""
        found = self.list(name, version)
        return found[-1] if found else None


def _rows(session: Session, name: str, version: int) -> list[EvaluationRecord]:
    adapter = queries.get_adapter_row(session, name)
    queries.require_version(session, adapter, version)
    rows = session.exec(
        select(EvaluationRow)
        .where(EvaluationRow.adapter_id == adapter.id, EvaluationRow.version == version)
        .order_by(EvaluationRow.id)
    ).all()
    return [_record(adapter.name, row) for row in rows]


def _record(name: str, row: EvaluationRow) -> EvaluationRecord:
    return EvaluationRecord(
        id=row.id,
        name=name,
        version=row.version,
        baseline=row.baseline,
        dataset_sha256=row.dataset_sha256,
        metrics=dict(row.metrics),
        created_at=row.created_at,
        created_by=row.created_by,
    )


def evaluation_problems(
    baseline: str, dataset_sha256: str, metrics: Mapping[str, Any]
) -> list[str]:
    """Every reason the evaluation cannot be stored (empty when it can)."""
    problems = []
    if not isinstance(baseline, str) or not baseline.strip():
        problems.append("baseline must be a non-empty string ('base' or NAME@VERSION)")
    elif len(baseline) > MAX_BASELINE_CHARS:
        problems.append(f"baseline is over {MAX_BASELINE_CHARS} characters")
    if not isinstance(dataset_sha256, str) or not _SHA256.fullmatch(dataset_sha256):
        problems.append("dataset_sha256 must be 64 lower-case hex digits")
    if not isinstance(metrics, Mapping):
        problems.append("metrics must be a JSON object")
        return problems
    try:
        # allow_nan=False: PostgreSQL's JSON refuses NaN and infinities.
        json.dumps(dict(metrics), allow_nan=False)
    except (TypeError, ValueError) as e:
        problems.append(f"metrics are not finite JSON: {e}")
    return problems


def summary_line(record: EvaluationRecord) -> str:
    """`vs base: loss 1.20 (base 2.31), exact_match 0.83 (base 0.00), ...` from the document
    trainer.evaluate stores (`metrics.version` / `metrics.baseline`, `forgetting`)."""
    document = record.metrics
    sides = document.get("metrics") if isinstance(document, Mapping) else None
    ours = sides.get("version", {}) if isinstance(sides, Mapping) else {}
    theirs = sides.get("baseline", {}) if isinstance(sides, Mapping) else {}
    parts = []
    for metric in SUMMARY_METRICS:
        value, other = ours.get(metric), theirs.get(metric)
        if _number(value):
            parts.append(
                f"{metric} {value:.3f}"
                + (f" ({record.baseline} {other:.3f})" if _number(other) else "")
            )
    forgetting = document.get("forgetting") if isinstance(document, Mapping) else None
    if isinstance(forgetting, Mapping) and _number(forgetting.get("forgetting")):
        parts.append(f"forgetting {forgetting['forgetting']:+.3f}")
    shown = ", ".join(parts) or "no metrics"
    return f"vs {record.baseline}: {shown}"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
