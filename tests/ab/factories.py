"""ExperimentRecord values for tests that need no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from registry.experiment_records import ExperimentRecord, Variant
from server.ab.config import ExperimentConfig


def experiment(
    *,
    versions: tuple[int, ...] = (3, 4),
    weights: tuple[float, ...] | None = None,
    ramp: tuple[float, ...] | None = (1.0, 5.0, 10.0, 25.0, 50.0),
    step: int = 0,
    salt: str = "0123456789abcdef0123456789abcdef",
    started_ago: float = 0.0,
    step_ago: float = 0.0,
    config: dict | None = None,
    analysis: dict | None = None,
    id: int = 1,
) -> ExperimentRecord:
    now = datetime.now(UTC)
    weights = weights or tuple(1.0 for _ in versions)
    variants = tuple(
        Variant(i, v, w, "control" if i == 0 else "candidate")
        for i, (v, w) in enumerate(zip(versions, weights, strict=True))
    )
    return ExperimentRecord(
        id=id, name="support", status="running", salt=salt, hash_version=1,
        variants=variants, ramp=ramp, step=step,
        step_started_at=now - timedelta(seconds=step_ago),
        config=ExperimentConfig(**(config or {})).to_json(), analysis=analysis or {},
        decision={}, analysed_at=None, created_at=now - timedelta(seconds=started_ago),
        created_by="test", ended_at=None, ended_by=None, end_reason=None,
    )  # fmt: skip
