"""A/B experiments in the registry database: start, ramp steps and end (the only experiment writes
that bump the revision servers poll), buffered per-request recording and feedback (which never
touch the revision row), and the decision pass's transaction, one replica at a time.

Locks are always taken in one order (experiment row, then adapter row, then the revision row;
completions, then users, then counters), so writers queue instead of deadlocking; a recording
batch that still loses a PostgreSQL deadlock race is retried. The statistics live in the server:
this module stores and locks, and decides nothing.
"""

from __future__ import annotations

import builtins
import json
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, fields
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine, case, delete, false, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, select

from registry import queries
from registry.errors import (
    CompletionNotFoundError,
    ExperimentConflictError,
    ExperimentNotRunningError,
    InvalidExperimentError,
    InvalidFeedbackError,
    RegistryUnavailableError,
)
from registry.experiment_records import (
    CANDIDATE,
    CONTROL,
    COUNTER_FIELDS,
    ENDED_STATUSES,
    RUNNING,
    CompletionDelta,
    CounterDelta,
    ExperimentEvent,
    ExperimentRecord,
    Rating,
    ReplicaState,
    UserDelta,
    UserOutcome,
    Variant,
    VariantSpec,
    VariantTotals,
    merge_completions,
    merge_counters,
    merge_users,
    plan_problems,
)
from registry.records import AliasMove
from registry.refs import DEFAULT_ALIAS, check_actor, check_alias, check_name
from registry.store import (
    EXPERIMENT,
    PROMOTE,
    RegistryStore,
    bump_revision,
    lock_adapter,
    move_alias,
)
from registry.tables import (
    AdapterRow,
    AliasRow,
    ExperimentCompletionRow,
    ExperimentCounterRow,
    ExperimentEventRow,
    ExperimentReplicaRow,
    ExperimentRow,
    ExperimentUserRow,
    utc_now,
)

START, ADVANCE, END = "start", "advance", "end"
HASH_VERSION = 1  # how servers map (salt, user) to a bucket; bump it with a new scheme
_USERS = ExperimentUserRow.__table__
_COUNTERS = ExperimentCounterRow.__table__
_COMPLETIONS = ExperimentCompletionRow.__table__
_REPLICAS = ExperimentReplicaRow.__table__
_USER_COUNTS = ("requests", "errors", "slow", "output_tokens")
# Columns a delta does not carry, as a new row starts them.
_NEW_USER = {"feedback_sum": 0.0, "feedback_count": 0, "analysed": False, "error_counted": False}
_NEW_COUNTER = {"feedback_count": 0, "feedback_sum": 0.0}
_CHUNK = 500  # rows per IN (...) list: far below SQLite's bound-parameter limit
_ATTEMPTS = 3
_LOST_RACE = {"40P01", "40001"}  # PostgreSQL: deadlock detected, serialization failure
T = TypeVar("T")


class ExperimentStore:
    """Experiments on `engine`, through the same session helpers as RegistryStore."""

    def __init__(self, engine: Engine, *, sessions: RegistryStore | None = None) -> None:
        self.engine = engine
        self._sessions = sessions if sessions is not None else RegistryStore(engine)
        postgres = engine.dialect.name == "postgresql"
        self._insert = postgresql_insert if postgres else sqlite_insert

    # Lifecycle: each one transaction that bumps the revision.

    def start(
        self,
        name: str,
        *,
        variants: Sequence[VariantSpec],
        ramp: Sequence[float] | None,
        config: Mapping[str, Any],
        actor: str,
        reason: str = "",
    ) -> ExperimentRecord:
        """Start splitting NAME's traffic between `variants` (the first is the control)."""
        check_name(name)
        check_actor(actor)
        specs = tuple(variants)
        problems = plan_problems(specs, ramp, config)
        if problems:
            raise InvalidExperimentError(problems)
        with self._sessions.write() as session:
            adapter = lock_adapter(session, name)
            queries.require_versions(session, adapter, [s.version for s in specs])
            running = queries.find_running_experiment(session, adapter)
            if running is not None:
                raise _conflict(name, running)
            now = utc_now()
            row = ExperimentRow(
                adapter_id=adapter.id,
                running_adapter_id=adapter.id,
                status=RUNNING,
                salt=secrets.token_hex(16),
                hash_version=HASH_VERSION,
                variants=[
                    Variant(i, s.version, float(s.weight), CANDIDATE if i else CONTROL).to_json()
                    for i, s in enumerate(specs)
                ],
                ramp=[float(p) for p in ramp] if ramp is not None else None,
                step=0,
                step_started_at=now,
                config=dict(config),
                analysis={},
                decision={},
                created_at=now,
                created_by=actor,
            )
            session.add(row)
            session.flush()
            details = {"variants": row.variants, "ramp": row.ramp, "config": row.config}
            _add_event(session, row, kind=START, actor=actor, reason=reason, details=details)
            bump_revision(session, at=now)
            return queries.experiment_record(name, row)

    def end(
        self,
        experiment_id: int,
        *,
        status: str,
        actor: str,
        reason: str,
        details: Mapping[str, Any],
        alias: str = DEFAULT_ALIAS,
        to_version: int | None = None,
    ) -> tuple[ExperimentRecord, AliasMove | None]:
        """End a running experiment; with `to_version`, `alias` moves there (a "promote")."""
        _check_end(status=status, actor=actor, alias=alias, details=details)
        with self._sessions.write() as session:
            row = _lock_experiment(session, experiment_id)
            if row is None:
                raise queries.experiment_not_found(session, experiment_id)
            adapter = lock_adapter(session, session.get(AdapterRow, row.adapter_id).name)
            move = _end(
                session,
                row,
                adapter,
                status=status,
                actor=actor,
                reason=reason,
                details=details,
                alias=alias,
                to_version=to_version,
            )
            return queries.experiment_record(adapter.name, row), move

    # Reads.

    def get(self, experiment_id: int) -> ExperimentRecord:
        with self._sessions.read() as session:
            return queries.get_experiment(session, experiment_id)

    def running(self, name: str) -> ExperimentRecord | None:
        """NAME's running experiment, or None (AdapterNotFoundError for an unknown name)."""
        with self._sessions.read() as session:
            adapter = queries.get_adapter_row(session, name)
            row = queries.find_running_experiment(session, adapter)
            return queries.experiment_record(adapter.name, row) if row is not None else None

    def latest(self, name: str) -> ExperimentRecord:
        """NAME's newest experiment, running or ended."""
        with self._sessions.read() as session:
            adapter = queries.get_adapter_row(session, name)
            row = session.exec(
                select(ExperimentRow)
                .where(ExperimentRow.adapter_id == adapter.id)
                .order_by(ExperimentRow.id.desc())
            ).first()
            if row is None:
                raise queries.no_experiments(name)
            return queries.experiment_record(adapter.name, row)

    def list(
        self, *, name: str | None = None, running_only: bool = False
    ) -> builtins.list[ExperimentRecord]:
        with self._sessions.read() as session:
            return queries.list_experiments(session, name=name, running_only=running_only)

    def events(self, experiment_id: int) -> builtins.list[ExperimentEvent]:
        with self._sessions.read() as session:
            rows = session.exec(
                select(ExperimentEventRow)
                .where(ExperimentEventRow.experiment_id == experiment_id)
                .order_by(ExperimentEventRow.id)
            ).all()
            if not rows:  # every experiment has its start event
                raise queries.experiment_not_found(session, experiment_id)
            return [queries.event_record(r) for r in rows]

    def totals(self, experiment_id: int) -> dict[int, VariantTotals]:
        """Every variant's counters (zeros where nothing was recorded) and users seen."""
        with self._sessions.read() as session:
            experiment = queries.get_experiment(session, experiment_id)
            rows = session.exec(
                select(ExperimentCounterRow).where(
                    ExperimentCounterRow.experiment_id == experiment_id
                )
            ).all()
            counters = {r.variant: r for r in rows}
            users = queries.exposure_counts(session, experiment)
        names = (*COUNTER_FIELDS, *_NEW_COUNTER)
        totals: dict[int, VariantTotals] = {}
        for index, count in users.items():
            row = counters.get(index)
            values = {n: getattr(row, n) for n in names} if row is not None else {}
            totals[index] = VariantTotals(variant=index, users=count, **values)
        return totals

    def exposure_counts(self, experiment_id: int) -> dict[int, int]:
        """Analysed-slice users seen, per variant (every variant present)."""
        with self._sessions.read() as session:
            return queries.exposure_counts(session, queries.get_experiment(session, experiment_id))

    def replicas(self, experiment_id: int) -> builtins.list[ReplicaState]:
        with self._sessions.read() as session:
            queries.get_experiment(session, experiment_id)
            rows = session.exec(
                select(ExperimentReplicaRow)
                .where(ExperimentReplicaRow.experiment_id == experiment_id)
                .order_by(ExperimentReplicaRow.replica_id)
            ).all()
            return [ReplicaState(r.replica_id, r.state, r.reason, r.updated_at) for r in rows]

    # Recording: never touches the revision row.

    def record(
        self,
        *,
        users: Sequence[UserDelta],
        counters: Sequence[CounterDelta],
        completions: Sequence[CompletionDelta],
    ) -> None:
        """Add one flush's deltas, in one transaction of a few executemany batches."""
        user_rows = [_row(u) | _NEW_USER for u in merge_users(users)]
        counter_rows = [_row(c) | _NEW_COUNTER for c in merge_counters(counters)]
        completion_rows = [_row(c) for c in merge_completions(completions)]
        ids = {r["experiment_id"] for r in (*user_rows, *counter_rows, *completion_rows)}
        if not ids:
            return

        def write(session: Session) -> None:
            queries.require_experiments(session, ids)
            if completion_rows:
                insert = self._insert(_COMPLETIONS).on_conflict_do_nothing(
                    index_elements=["completion_id"]
                )
                session.execute(insert, completion_rows)
            if user_rows:
                session.execute(self._upsert_users(), user_rows)
            if counter_rows:
                session.execute(self._upsert_counters(COUNTER_FIELDS), counter_rows)

        self._retrying(write)

    def rate(
        self, completion_id: str, score: float, *, ttl_seconds: float, now: datetime | None = None
    ) -> Rating:
        """Join a feedback score to the variant that served `completion_id` (first score wins)."""
        if not _is_number(score) or not 0.0 <= score <= 1.0:
            raise InvalidFeedbackError(f"a feedback score is a number in [0, 1], got {score!r}")
        at = now or utc_now()

        def write(session: Session) -> Rating:
            row = session.exec(
                select(ExperimentCompletionRow)
                .where(ExperimentCompletionRow.completion_id == completion_id)
                .with_for_update()
            ).first()
            if row is None or row.created_at < at - timedelta(seconds=ttl_seconds):
                raise CompletionNotFoundError(
                    f"no completion {completion_id!r} to rate: unknown, or older than "
                    f"{ttl_seconds:g} s (feedback is kept for {ttl_seconds:g} s after a completion)"
                )
            experiment = queries.get_experiment(session, row.experiment_id)
            rating = Rating(
                completion_id=row.completion_id,
                experiment_id=row.experiment_id,
                name=experiment.name,
                variant=row.variant,
                version=experiment.variants[row.variant].version,
                score=row.score if row.score is not None else float(score),
                duplicate=row.score is not None,
                analysed=row.analysed,
            )
            if rating.duplicate:
                return rating
            row.score, row.rated_at = float(score), at
            session.add(row)
            session.flush()
            if row.user_hash is not None:
                session.execute(
                    update(_USERS)
                    .where(
                        _USERS.c.experiment_id == row.experiment_id,
                        _USERS.c.user_hash == row.user_hash,
                    )
                    .values(
                        feedback_sum=_USERS.c.feedback_sum + float(score),
                        feedback_count=_USERS.c.feedback_count + 1,
                    )
                )
            feedback = asdict(CounterDelta(row.experiment_id, row.variant))
            feedback.update(feedback_count=1, feedback_sum=float(score))
            session.execute(self._upsert_counters(("feedback_count", "feedback_sum")), [feedback])
            return rating

        return self._retrying(write)

    def purge_completions(self, *, older_than: datetime) -> int:
        """Forget completions created before `older_than` (their feedback window is over)."""
        with self._sessions.write() as session:
            done = session.execute(
                delete(_COMPLETIONS).where(_COMPLETIONS.c.created_at < older_than)
            )
            return done.rowcount

    def heartbeat(
        self, experiment_id: int, replica_id: str, *, state: str, reason: str = ""
    ) -> None:
        """Record what replica `replica_id` says about the experiment now."""
        problems = [
            f"{label} must be 1-{limit} characters, got {value[:80]!r}"
            for label, value, limit in (("replica id", replica_id, 64), ("state", state, 16))
            if not 0 < len(value) <= limit
        ]
        if problems:
            raise InvalidExperimentError(problems)
        with self._sessions.write() as session:
            queries.require_experiments(session, {experiment_id})
            insert = self._insert(_REPLICAS).values(
                experiment_id=experiment_id,
                replica_id=replica_id,
                state=state,
                reason=reason,
                updated_at=utc_now(),
            )
            session.execute(
                insert.on_conflict_do_update(
                    index_elements=["experiment_id", "replica_id"],
                    set_={c: insert.excluded[c] for c in ("state", "reason", "updated_at")},
                )
            )

    # The decision pass.

    @contextmanager
    def analysis(self, experiment_id: int) -> Iterator[AnalysisTx | None]:
        """One write transaction holding the experiment's row, or None.

        None when another replica's pass holds it (PostgreSQL skips a locked row; SQLite has
        one writer, so this waits for it) or when the experiment is no longer running.
        """
        with self._sessions.write() as session:
            row = _lock_experiment(session, experiment_id, skip_locked=True)
            if row is None:
                exists = session.exec(
                    select(ExperimentRow.id).where(ExperimentRow.id == experiment_id)
                ).first()
                if exists is None:
                    raise queries.experiment_not_found(session, experiment_id)
                yield None
            elif row.status != RUNNING:
                yield None
            else:
                yield AnalysisTx(session, row, session.get(AdapterRow, row.adapter_id).name)

    # Helpers.

    def _retrying(self, work: Callable[[Session], T]) -> T:
        """Run `work` in a write transaction, again if PostgreSQL aborted it to break a deadlock
        (the aborted attempt wrote nothing)."""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with self._sessions.write() as session:
                    return work(session)
            except RegistryUnavailableError as e:
                orig = getattr(e.__cause__, "orig", None)
                if attempt == _ATTEMPTS or getattr(orig, "sqlstate", None) not in _LOST_RACE:
                    raise
        raise AssertionError("unreachable")

    def _upsert_users(self) -> Any:
        insert = self._insert(_USERS)
        new, old = insert.excluded, _USERS.c
        changes: dict[str, Any] = {c: old[c] + new[c] for c in _USER_COUNTS}
        changes["first_seen_at"] = case(
            (new.first_seen_at < old.first_seen_at, new.first_seen_at), else_=old.first_seen_at
        )
        changes["first_error_at"] = case(
            (old.first_error_at.is_(None), new.first_error_at),
            (new.first_error_at < old.first_error_at, new.first_error_at),
            else_=old.first_error_at,
        )
        # The variant is not in the update: a user keeps the arm they were first seen in.
        return insert.on_conflict_do_update(
            index_elements=["experiment_id", "user_hash"], set_=changes
        )

    def _upsert_counters(self, columns: Sequence[str]) -> Any:
        insert = self._insert(_COUNTERS)
        return insert.on_conflict_do_update(
            index_elements=["experiment_id", "variant"],
            set_={c: _COUNTERS.c[c] + insert.excluded[c] for c in columns},
        )


class AnalysisTx:
    """The decision pass's view of one running experiment, inside its locked transaction."""

    def __init__(self, session: Session, row: ExperimentRow, name: str) -> None:
        self._session, self._row, self._name = session, row, name
        self.experiment: ExperimentRecord = queries.experiment_record(name, row)

    def closed_users(self, *, closed_before: datetime, limit: int) -> list[UserOutcome]:
        """Users not analysed yet whose window closed (first seen by `closed_before`), in
        exposure order."""
        return self._outcomes(
            (_USERS.c.analysed == false(), _USERS.c.first_seen_at <= closed_before),
            order=(_USERS.c.first_seen_at, _USERS.c.user_hash),
            limit=limit,
        )

    def new_first_errors(self, *, limit: int) -> list[UserOutcome]:
        """Users whose first error the error-rate test has not counted yet, in error order."""
        return self._outcomes(
            (_USERS.c.first_error_at.is_not(None), _USERS.c.error_counted == false()),
            order=(_USERS.c.first_error_at, _USERS.c.user_hash),
            limit=limit,
        )

    def exposure_counts(self) -> dict[int, int]:
        return queries.exposure_counts(self._session, self.experiment)

    def mark_analysed(self, user_hashes: Sequence[str]) -> None:
        self._mark(user_hashes, analysed=True)

    def mark_errors_counted(self, user_hashes: Sequence[str]) -> None:
        self._mark(user_hashes, error_counted=True)

    def save(self, *, analysis: Mapping[str, Any], decision: Mapping[str, Any]) -> None:
        """Keep the procedures' state and conclusion (servers need no reload: no revision bump)."""
        _require_json(analysis=analysis, decision=decision)
        row = self._row
        row.analysis, row.decision, row.analysed_at = dict(analysis), dict(decision), utc_now()
        self._changed()

    def advance(self, step: int, *, actor: str, reason: str, details: Mapping[str, Any]) -> None:
        """Move to ramp step `step` (servers pick the new share up with the revision)."""
        check_actor(actor)
        row = self._require_running()
        _require_json(details=details)
        last = len(row.ramp) - 1 if row.ramp else 0
        if not row.step < step <= last:
            raise InvalidExperimentError(
                [f"step {step} is not after step {row.step} within the ramp (steps 0..{last})"]
            )
        now = utc_now()
        row.step, row.step_started_at = step, now
        _add_event(self._session, row, kind=ADVANCE, actor=actor, reason=reason, details=details)
        bump_revision(self._session, at=now)
        self._changed()

    def end(
        self,
        *,
        status: str,
        actor: str,
        reason: str,
        details: Mapping[str, Any],
        alias: str = DEFAULT_ALIAS,
        to_version: int | None = None,
    ) -> AliasMove | None:
        """ExperimentStore.end inside this transaction."""
        _check_end(status=status, actor=actor, alias=alias, details=details)
        adapter = lock_adapter(self._session, self._name)
        move = _end(
            self._session,
            self._row,
            adapter,
            status=status,
            actor=actor,
            reason=reason,
            details=details,
            alias=alias,
            to_version=to_version,
        )
        self._changed()
        return move

    def _require_running(self) -> ExperimentRow:
        if self._row.status != RUNNING:
            raise _not_running(self._name, self._row)
        return self._row

    def _changed(self) -> None:
        self._session.add(self._row)
        self._session.flush()
        self.experiment = queries.experiment_record(self._name, self._row)

    def _outcomes(self, where: tuple[Any, ...], *, order: tuple[Any, ...], limit: int) -> Any:
        # Core rows, not ORM objects: a second read in this pass must see fresh values.
        rows = self._session.execute(
            select(*(_USERS.c[f] for f in UserOutcome.__slots__))
            .where(_USERS.c.experiment_id == self._row.id, *where)
            .order_by(*order)
            .limit(limit)
        ).all()
        return [UserOutcome(*r) for r in rows]

    def _mark(self, user_hashes: Sequence[str], **flag: bool) -> None:
        hashes = sorted(set(user_hashes))  # one lock order with concurrent recording
        for start in range(0, len(hashes), _CHUNK):
            self._session.execute(
                update(_USERS)
                .where(
                    _USERS.c.experiment_id == self._row.id,
                    _USERS.c.user_hash.in_(hashes[start : start + _CHUNK]),
                )
                .values(**flag)
            )


# --- shared by ExperimentStore and AnalysisTx ---------------------------------------------------


def _lock_experiment(
    session: Session, experiment_id: int, *, skip_locked: bool = False
) -> ExperimentRow | None:
    # FOR NO KEY UPDATE: exclusive among writers of the row, yet recording's foreign-key checks
    # (FOR KEY SHARE) go on. SQLite ignores it: BEGIN IMMEDIATE already made this the only writer.
    return session.exec(
        select(ExperimentRow)
        .where(ExperimentRow.id == experiment_id)
        .with_for_update(key_share=True, skip_locked=skip_locked)
    ).first()


def _end(
    session: Session,
    row: ExperimentRow,
    adapter: AdapterRow,
    *,
    status: str,
    actor: str,
    reason: str,
    details: Mapping[str, Any],
    alias: str,
    to_version: int | None,
) -> AliasMove | None:
    """End `row` (locked, as is `adapter`): its event, the alias outcome, one revision bump."""
    if row.status != RUNNING:
        raise _not_running(adapter.name, row)
    if to_version is not None:
        queries.require_versions(session, adapter, [to_version])
    now = utc_now()
    row.status, row.running_adapter_id = status, None
    row.ended_at, row.ended_by, row.end_reason = now, actor, reason
    session.add(row)
    ended = {**details, "status": status, "alias": alias, "to_version": to_version}
    _add_event(session, row, kind=END, actor=actor, reason=reason, details=ended)
    outcome = {**details, "experiment": row.id, "status": status}
    current = session.get(AliasRow, (adapter.id, alias))
    if to_version is not None and (current is None or current.version != to_version):
        kind, target = PROMOTE, to_version
    elif current is not None:
        kind, target = EXPERIMENT, current.version
    else:
        bump_revision(session, at=now)
        return None
    return move_alias(
        session,
        adapter,
        alias=alias,
        to=target,
        kind=kind,
        actor=actor,
        reason=reason,
        details=outcome,
    )


def _check_end(*, status: str, actor: str, alias: str, details: Mapping[str, Any]) -> None:
    check_actor(actor)
    check_alias(alias)
    if status not in ENDED_STATUSES:
        raise InvalidExperimentError(
            [f"an experiment ends as one of {', '.join(ENDED_STATUSES)}; got {status!r}"]
        )
    _require_json(details=details)


def _require_json(**values: Mapping[str, Any]) -> None:
    problems = []
    for label, value in values.items():
        try:
            json.dumps(dict(value), allow_nan=False)
        except (TypeError, ValueError) as e:
            problems.append(f"{label} must be plain JSON (no NaN or infinity): {e}")
    if problems:
        raise InvalidExperimentError(problems)


def _add_event(
    session: Session,
    row: ExperimentRow,
    *,
    kind: str,
    actor: str,
    reason: str,
    details: Mapping[str, Any],
) -> None:
    session.add(
        ExperimentEventRow(
            experiment_id=row.id,
            kind=kind,
            step=row.step,
            actor=actor,
            reason=reason,
            details=dict(details),
            at=utc_now(),
        )
    )


def _conflict(name: str, running: ExperimentRow) -> ExperimentConflictError:
    versions = " vs ".join(str(v["version"]) for v in running.variants)
    return ExperimentConflictError(
        f"{name} already has experiment {running.id} running (versions {versions}, started "
        f"{running.created_at:%Y-%m-%d %H:%M} UTC by {running.created_by}); one experiment "
        f"per name at a time: stop it first with loraplex ab stop {name}"
    )


def _not_running(name: str, row: ExperimentRow) -> ExperimentNotRunningError:
    when = f"{row.ended_at:%Y-%m-%d %H:%M} UTC" if row.ended_at else "earlier"
    return ExperimentNotRunningError(
        f"experiment {row.id} on {name} is not running: it ended {row.status} {when} "
        f"by {row.ended_by}"
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _row(delta: Any) -> dict[str, Any]:
    """A flat delta as a row dict: `dataclasses.asdict` deep-copies and costs ~40 % of a flush."""
    names = _FIELDS.get(type(delta))
    if names is None:
        names = _FIELDS[type(delta)] = tuple(f.name for f in fields(delta))
    return {name: getattr(delta, name) for name in names}


_FIELDS: dict[type, tuple[str, ...]] = {}
