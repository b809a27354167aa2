"""Fine-tuning's storage: uploaded files' metadata, jobs, their events and checkpoints, in the
registry database (tables: registry.fine_tuning_tables). Jobs are a queue: a worker claims the
oldest unclaimed one under a row lock (`FOR UPDATE SKIP LOCKED` on PostgreSQL; on SQLite the
write transaction's BEGIN IMMEDIATE serialises claims), so two workers never take one job.
A claimed job carries its worker's name and heartbeat, and the newest checkpoint its worker
uploaded: a worker that takes over a job whose worker fell silent resumes from there. A paused
job has no worker and waits for `resume`. The file and checkpoint bytes live in the artifact
store; this module only records where.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_
from sqlmodel import Session, select

from registry.errors import NotFoundError, RegistryUserError
from registry.fine_tuning_tables import CheckpointRow, FileRow, JobEventRow, JobRow
from registry.store import RegistryStore
from registry.tables import utc_now

PENDING = ("validating_files", "queued")
ACTIVE = (*PENDING, "running")
FINISHED = ("succeeded", "failed", "cancelled")
DROPPED = ("failed", "cancelled")  # their checkpoints are neither resumed nor served: gc takes them
PAUSED = "paused"
STALE_SECONDS = 120.0  # a worker beats every second or so while it trains


class FineTuningNotFoundError(NotFoundError):
    pass


class FineTuningStateError(RegistryUserError):
    """The job's status does not allow what was asked (pausing a finished job)."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class FineTuningStore:
    """Files, jobs, events and checkpoints; every write is one transaction."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    # Files

    def add_file(self, **fields: Any) -> FileRow:
        row = FileRow(id=new_id("file"), **fields)
        with self._store.write() as session:
            session.add(row)
        return row

    def get_file(self, file_id: str) -> FileRow:
        with self._store.read() as session:
            return _file(session, file_id)

    def list_files(self, *, purpose: str | None = None, limit: int = 10000) -> list[FileRow]:
        query = select(FileRow).order_by(FileRow.seq.desc()).limit(limit)
        if purpose is not None:
            query = query.where(FileRow.purpose == purpose)
        with self._store.read() as session:
            return list(session.exec(query))

    def delete_file(self, file_id: str) -> FileRow:
        with self._store.write() as session:
            row = _file(session, file_id)
            session.delete(row)
        return row

    # Jobs

    def create_job(self, **fields: Any) -> JobRow:
        """A new job, `validating_files`, with its first event."""
        row = JobRow(id=new_id("ftjob"), status="validating_files", **fields)
        with self._store.write() as session:
            session.add(row)
            session.flush()
            session.add(_event(row, f"Created fine-tuning job: {row.id}"))
        return row

    def get_job(self, job_id: str) -> JobRow:
        with self._store.read() as session:
            return _job(session, job_id)

    def list_jobs(
        self, *, after: str | None = None, limit: int = 20, metadata: Mapping[str, str] = {}
    ) -> tuple[list[JobRow], bool]:
        """Newest first, after the job `after` (cursor), the ones whose metadata has every
        given key=value; and whether more follow."""
        with self._store.read() as session:
            query = select(JobRow).order_by(JobRow.seq.desc())
            if after is not None:
                query = query.where(JobRow.seq < _job(session, after).seq)
            found = []
            for row in session.exec(query):  # metadata is JSON: filtered here, portably
                if all((row.job_metadata or {}).get(k) == v for k, v in metadata.items()):
                    found.append(row)
                    if len(found) > limit:
                        break
        return found[:limit], len(found) > limit

    def request_cancel(self, job_id: str) -> JobRow:
        """A job not started yet (or paused) is cancelled at once; a running one is flagged for
        its worker (which stops the training and marks it cancelled); a finished one is left as
        it is."""
        with self._store.write() as session:
            row = _job(session, job_id, lock=True)
            if row.status in (*PENDING, PAUSED) and row.worker is None:
                _finish(session, row, "cancelled")
            elif row.status in ACTIVE:
                row.cancel_requested = True
                session.add(row)
        return row

    def request_pause(self, job_id: str) -> JobRow:
        """A job no worker holds is paused at once; a claimed one is flagged for its worker
        (which stops the training, keeping its newest uploaded checkpoint, and marks it
        paused). A paused job is left as it is; a finished one cannot be paused."""
        with self._store.write() as session:
            row = _job(session, job_id, lock=True)
            if row.status in FINISHED:
                raise FineTuningStateError(f"{job_id} is {row.status}: it cannot be paused")
            if row.status in PENDING and row.worker is None:
                row.status = PAUSED
                session.add(_event(row, "Fine-tuning job paused"))
            elif row.status != PAUSED:
                row.pause_requested = True
            session.add(row)
        return row

    def request_resume(self, job_id: str) -> JobRow:
        """A paused job is queued again (a worker continues it from its newest checkpoint); a
        pause not carried out yet is withdrawn; any other status cannot be resumed."""
        with self._store.write() as session:
            row = _job(session, job_id, lock=True)
            if row.status == PAUSED:
                row.status, row.worker, row.pause_requested = "queued", None, False
                step = f" from step {row.checkpoint_step}" if row.checkpoint_step else ""
                session.add(_event(row, f"Fine-tuning job resumed: queued to continue{step}"))
            elif row.status in ACTIVE and row.pause_requested:
                row.pause_requested = False
            else:
                raise FineTuningStateError(
                    f"{job_id} is {row.status}: only a paused job can be resumed"
                )
            session.add(row)
        return row

    def claim(self, worker: str, *, stale_seconds: float = STALE_SECONDS) -> JobRow | None:
        """The oldest unclaimed pending job, or an active one whose worker has not beaten for
        `stale_seconds` (it died: the job continues here, from its newest uploaded checkpoint if
        any), now this worker's; None when there is none."""
        stale = utc_now() - timedelta(seconds=stale_seconds)
        with self._store.write() as session:
            unclaimed = and_(JobRow.status.in_(PENDING), JobRow.worker.is_(None))
            abandoned = and_(JobRow.status.in_(ACTIVE), JobRow.worker.is_not(None),
                             JobRow.heartbeat_at < stale, JobRow.cancel_requested.is_(False),
                             JobRow.pause_requested.is_(False))  # fmt: skip
            query = (
                select(JobRow)
                .where(or_(unclaimed, abandoned))
                .order_by(JobRow.seq)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            row = session.exec(query).first()
            if row is None:
                return None
            now, previous, last = utc_now(), row.worker, row.heartbeat_at
            row.worker, row.heartbeat_at, row.started_at = worker, now, now
            session.add(row)
            taken = f" from {previous}, silent since {last:%Y-%m-%d %H:%M:%S}" if previous else ""
            session.add(_event(row, f"Claimed by worker {worker}{taken}"))
        return row

    def heartbeat(self, job_id: str, worker: str) -> bool:
        """Record that `worker` still runs the job; whether it must stop (a cancel or a pause
        was asked for, or the job was given to another worker after this one fell silent)."""
        with self._store.write() as session:
            row = _job(session, job_id, lock=True)
            if row.worker != worker:
                return True
            row.heartbeat_at = utc_now()
            session.add(row)
            return row.cancel_requested or row.pause_requested

    def set_status(
        self, job_id: str, status: str, *, message: str | None = None, level: str = "info",
        **fields: Any,
    ) -> JobRow:  # fmt: skip
        """Move the job to `status` (finished ones get finished_at), set `fields`, and log
        `message` as an event, in one transaction."""
        with self._store.write() as session:
            row = _job(session, job_id, lock=True)
            for key, value in fields.items():
                setattr(row, key, value)
            if status in FINISHED:
                _finish(session, row, status)
            else:
                row.status = status
                session.add(row)
            if message:
                session.add(_event(row, message, level=level))
        return row

    # Events and checkpoints

    def add_event(
        self, job_id: str, message: str, *, level: str = "info", type: str = "message",
        data: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        with self._store.write() as session:
            row = _job(session, job_id)
            session.add(_event(row, message, level=level, type=type, data=data))

    def list_events(
        self, job_id: str, *, after: str | None = None, limit: int = 20
    ) -> tuple[list[JobEventRow], bool]:
        """Newest first, after the event `after` (an id as `event_id` writes it)."""
        with self._store.read() as session:
            job = _job(session, job_id)
            query = select(JobEventRow).where(JobEventRow.job_seq == job.seq)
            if after is not None:
                query = query.where(JobEventRow.seq < _seq(after, "ftevent"))
            rows = list(session.exec(query.order_by(JobEventRow.seq.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def add_checkpoint(
        self, job_id: str, step: int, metrics: Mapping[str, Any], *,
        blob_sha256: str | None = None,
    ) -> None:  # fmt: skip
        """Record a checkpoint; with `blob_sha256` (its folder in the artifact store) it becomes
        the job's newest resumable one when its step is past the one recorded."""
        with self._store.write() as session:
            job = _job(session, job_id, lock=True)
            session.add(CheckpointRow(job_seq=job.seq, step=step, metrics=dict(metrics),
                                      blob_sha256=blob_sha256))  # fmt: skip
            if blob_sha256 is not None and step > (job.checkpoint_step or 0):
                job.checkpoint_sha256, job.checkpoint_step = blob_sha256, step
                session.add(job)

    def list_checkpoints(
        self, job_id: str, *, after: str | None = None, limit: int = 10
    ) -> tuple[list[CheckpointRow], bool]:
        with self._store.read() as session:
            job = _job(session, job_id)
            query = select(CheckpointRow).where(CheckpointRow.job_seq == job.seq)
            if after is not None:
                query = query.where(CheckpointRow.seq < _seq(after, "ftckpt"))
            rows = list(session.exec(query.order_by(CheckpointRow.seq.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit


FINE_TUNED_PREFIX = "ft:"
ORGANIZATION = "loraplex"
CHECKPOINT_MARK = ":ckpt-step-"  # ft:...:{id}:ckpt-step-{N}, OpenAI's checkpoint model id
# An uploaded checkpoint blob holds the run record and this folder (the trainer's own layout);
# the folder is a PEFT adapter (plus the optimizer's state), so the server can serve it as is.
CHECKPOINT_FOLDER = "checkpoints/checkpoint-{step}"


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """A job's uploaded checkpoint as something to serve: `ref` is its checkpoint model id;
    the adapter is the folder `adapter_path` inside the artifact blob `sha256`."""

    ref: str
    sha256: str
    step: int
    job_id: str

    @property
    def adapter_path(self) -> str:
        return CHECKPOINT_FOLDER.format(step=self.step)


def fine_tuned_model_id(job: JobRow) -> str:
    """The job's result as OpenAI names it, `ft:{base}:{organization}:{suffix}:{id}` (the
    job id's last 8 characters; a job continuing a fine-tuned model names that model's base);
    the server resolves it to the registered NAME@V."""
    base = job.model
    if base.startswith(FINE_TUNED_PREFIX):
        base = base.removeprefix(FINE_TUNED_PREFIX).partition(":")[0]
    return f"{FINE_TUNED_PREFIX}{base}:{ORGANIZATION}:{job.suffix}:{job.id[-8:]}"


def resolve_fine_tuned(store: RegistryStore, model: str) -> str:
    """The NAME@V a `ft:` model id names; FineTuningNotFoundError when no succeeded job has it."""
    with store.read() as session:
        query = select(JobRow.result_ref).where(JobRow.fine_tuned_model == model)
        ref = session.exec(query).first()
    if ref is None:
        raise FineTuningNotFoundError(f"No fine-tuned model {model!r}")
    return ref


def checkpoint_model_id(job: JobRow, step: int) -> str:
    """The id a checkpoint is called by, `ft:...:{id}:ckpt-step-{N}` as OpenAI names them."""
    return f"{fine_tuned_model_id(job)}{CHECKPOINT_MARK}{step}"


def is_checkpoint_model(model: str) -> bool:
    head, mark, step = model.rpartition(CHECKPOINT_MARK)
    return model.startswith(FINE_TUNED_PREFIX) and bool(head and mark) and step.isdigit()


def resolve_checkpoint(store: RegistryStore, model: str) -> CheckpointRecord:
    """The uploaded checkpoint a checkpoint model id names (of any job, running or done, whose
    checkpoint blobs are kept); FineTuningNotFoundError when there is none."""
    fine_tuned, _mark, step_text = model.rpartition(CHECKPOINT_MARK)
    step, short = int(step_text), fine_tuned.rpartition(":")[2]
    with store.read() as session:
        jobs = session.exec(select(JobRow).where(JobRow.id.endswith(short, autoescape=True)))
        job = next((j for j in jobs if fine_tuned_model_id(j) == fine_tuned), None)
        row = None
        if job is not None and job.status not in DROPPED:
            query = (
                select(CheckpointRow)
                .where(
                    CheckpointRow.job_seq == job.seq,
                    CheckpointRow.step == step,
                    CheckpointRow.blob_sha256.is_not(None),
                )  # fmt: skip
                .order_by(CheckpointRow.seq.desc())
            )
            row = session.exec(query).first()
    if job is None or row is None:
        raise FineTuningNotFoundError(f"No fine-tuned model checkpoint {model!r}")
    return CheckpointRecord(ref=model, sha256=row.blob_sha256, step=step, job_id=job.id)


def event_id(row: JobEventRow) -> str:
    return f"ftevent-{row.seq}"


def checkpoint_id(row: CheckpointRow) -> str:
    return f"ftckpt-{row.seq}"


def unix(at: datetime | None) -> int | None:
    return int(at.timestamp()) if at is not None else None


def _seq(cursor: str, prefix: str) -> int:
    number = cursor.removeprefix(f"{prefix}-")
    if not number.isdigit():
        raise FineTuningNotFoundError(f"no such cursor {cursor!r}")
    return int(number)


def _event(
    job: JobRow, message: str, *, level: str = "info", type: str = "message",
    data: Mapping[str, Any] | None = None,
) -> JobEventRow:  # fmt: skip
    return JobEventRow(
        job_seq=job.seq, level=level, type=type, message=message,
        data=dict(data) if data is not None else None,
    )  # fmt: skip


def _finish(session: Session, row: JobRow, status: str) -> None:
    row.status, row.finished_at = status, utc_now()
    session.add(row)
    if status == "cancelled":
        session.add(_event(row, "Fine-tuning job cancelled"))


def _file(session: Session, file_id: str) -> FileRow:
    row = session.exec(select(FileRow).where(FileRow.id == file_id)).first()
    if row is None:
        raise FineTuningNotFoundError(f"No such file: {file_id!r}")
    return row


def _job(session: Session, job_id: str, *, lock: bool = False) -> JobRow:
    query = select(JobRow).where(JobRow.id == job_id)
    row = session.exec(query.with_for_update() if lock else query).first()
    if row is None:
        raise FineTuningNotFoundError(f"No such fine-tuning job: {job_id!r}")
    return row
