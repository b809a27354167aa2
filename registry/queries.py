"""Read queries on the metadata store, each given an open session: resolve references, list,
history, the routing snapshot and experiment lookups. They return frozen records (records.py,
experiment_records.py) and raise *NotFoundError with a message that says what exists and how to
get what was asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func
from sqlmodel import Session, select

from registry.errors import (
    AdapterNotFoundError,
    AliasNotFoundError,
    ExperimentNotFoundError,
    VersionNotFoundError,
)
from registry.experiment_records import ExperimentEvent, ExperimentRecord, Variant
from registry.records import AdapterSummary, AliasMove, RoutingSnapshot, VersionRecord
from registry.refs import DEFAULT_ALIAS, AdapterRef, check_alias, parse_ref
from registry.tables import (
    AdapterRow,
    AliasEventRow,
    AliasRow,
    ExperimentEventRow,
    ExperimentRow,
    ExperimentUserRow,
    RegistryStateRow,
    VersionRow,
)

_MAX_NAMES_IN_MESSAGE = 20


def resolve(session: Session, ref: str | AdapterRef) -> VersionRecord:
    """`NAME` (alias production), `NAME@7` or `NAME@alias` -> the version it names now."""
    parsed = parse_ref(ref) if isinstance(ref, str) else ref
    adapter = get_adapter_row(session, parsed.name)
    if parsed.version is not None:
        return version_record(adapter.name, require_version(session, adapter, parsed.version))
    alias = session.get(AliasRow, (adapter.id, parsed.alias))
    if alias is None:
        raise _alias_not_found(session, adapter, parsed.alias or DEFAULT_ALIAS)
    return version_record(adapter.name, require_version(session, adapter, alias.version))


def get_version(session: Session, name: str, number: int) -> VersionRecord:
    adapter = get_adapter_row(session, name)
    return version_record(adapter.name, require_version(session, adapter, number))


def list_adapters(session: Session, *, name: str | None = None) -> list[AdapterSummary]:
    """Every adapter (or only `name`), by name, with its versions and aliases."""
    adapters = select(AdapterRow).order_by(AdapterRow.name)
    versions_q = select(VersionRow.adapter_id, VersionRow.number).order_by(VersionRow.number)
    aliases_q = select(AliasRow)
    if name is not None:
        adapters = adapters.where(AdapterRow.name == name)
        versions_q = versions_q.join(AdapterRow).where(AdapterRow.name == name)
        aliases_q = aliases_q.join(AdapterRow).where(AdapterRow.name == name)
    versions: dict[int, list[int]] = {}
    for adapter_id, number in session.exec(versions_q):
        versions.setdefault(adapter_id, []).append(number)
    aliases: dict[int, dict[str, int]] = {}
    for row in session.exec(aliases_q):
        aliases.setdefault(row.adapter_id, {})[row.alias] = row.version
    return [
        AdapterSummary(
            name=a.name,
            base_model=a.base_model,
            created_at=a.created_at,
            versions=tuple(versions.get(a.id, ())),
            aliases=aliases.get(a.id, {}),
        )
        for a in session.exec(adapters)
    ]


def get_adapter(session: Session, name: str) -> AdapterSummary:
    found = list_adapters(session, name=name)
    if not found:
        raise adapter_not_found(session, name)
    return found[0]


def history(session: Session, name: str, *, alias: str | None = None) -> list[AliasMove]:
    """Every alias move of `name` (or of one alias), oldest first."""
    adapter = get_adapter_row(session, name)
    query = select(AliasEventRow).where(AliasEventRow.adapter_id == adapter.id)
    if alias is not None:
        query = query.where(AliasEventRow.alias == check_alias(alias))
    return [alias_move(adapter.name, e) for e in session.exec(query.order_by(AliasEventRow.id))]


def routing_snapshot(session: Session) -> RoutingSnapshot:
    # The revision is read first: rows read after it are at least that new, so a poller that
    # reloads on a revision change never keeps rows older than the revision it saw.
    state = session.get(RegistryStateRow, 1)
    names = session.exec(
        select(AliasRow.alias, AliasRow.version, AdapterRow.name).join(
            AdapterRow, AdapterRow.id == AliasRow.adapter_id
        )
    ).all()
    latest = session.exec(
        select(AdapterRow.name, VersionRow.number)
        .join(AdapterRow, AdapterRow.id == VersionRow.adapter_id)
        .order_by(VersionRow.number)
    ).all()
    running = session.exec(
        select(ExperimentRow, AdapterRow.name)
        .join(AdapterRow, AdapterRow.id == ExperimentRow.adapter_id)
        .where(ExperimentRow.running_adapter_id.is_not(None))
    ).all()
    return RoutingSnapshot(
        revision=state.revision,
        changed_at=state.changed_at,
        aliases={(name, alias): version for alias, version, name in names},
        latest=dict(latest),
        experiments={name: experiment_record(name, row) for row, name in running},
    )


def current_revision(session: Session) -> int:
    return session.get(RegistryStateRow, 1).revision


def sha256_in_use(session: Session, sha256: str) -> bool:
    return (
        session.exec(select(VersionRow.id).where(VersionRow.sha256 == sha256)).first() is not None
    )


def referenced_sha256s(session: Session) -> set[str]:
    """Blobs something still points at: adapter versions, fine-tuning files and the uploaded
    checkpoints of jobs neither failed nor cancelled (resumable, and callable by their
    checkpoint model ids; registry gc keeps them)."""
    from registry.fine_tuning import DROPPED
    from registry.fine_tuning_tables import CheckpointRow, FileRow, JobRow

    versions = set(session.exec(select(VersionRow.sha256).distinct()).all())
    live = select(CheckpointRow.blob_sha256).join(JobRow, JobRow.seq == CheckpointRow.job_seq)
    live = live.where(JobRow.status.not_in(DROPPED), CheckpointRow.blob_sha256.is_not(None))
    files = set(session.exec(select(FileRow.blob_sha256).distinct()).all())
    return versions | files | set(session.exec(live.distinct()).all())


def find_adapter_row(session: Session, name: str) -> AdapterRow | None:
    return session.exec(select(AdapterRow).where(AdapterRow.name == name)).first()


def get_adapter_row(session: Session, name: str) -> AdapterRow:
    row = find_adapter_row(session, name)
    if row is None:
        raise adapter_not_found(session, name)
    return row


def require_version(session: Session, adapter: AdapterRow, number: int) -> VersionRow:
    row = session.exec(
        select(VersionRow).where(VersionRow.adapter_id == adapter.id, VersionRow.number == number)
    ).first()
    if row is None:
        raise VersionNotFoundError(
            f"{adapter.name} has no version {number}; versions: "
            f"{format_versions(version_numbers(session, adapter))}"
        )
    return row


def version_numbers(session: Session, adapter: AdapterRow) -> list[int]:
    return list(
        session.exec(
            select(VersionRow.number)
            .where(VersionRow.adapter_id == adapter.id)
            .order_by(VersionRow.number)
        )
    )


def adapter_not_found(session: Session, name: str) -> AdapterNotFoundError:
    names = list(session.exec(select(AdapterRow.name).order_by(AdapterRow.name)))
    if not names:
        known = "the registry is empty"
    elif len(names) > _MAX_NAMES_IN_MESSAGE:
        known = f"adapters: {', '.join(names[:_MAX_NAMES_IN_MESSAGE])}, ... ({len(names)} in all)"
    else:
        known = f"adapters: {', '.join(names)}"
    return AdapterNotFoundError(
        f"no adapter named {name!r}; {known}. Register one: loraplex registry register {name} PATH"
    )


def format_versions(numbers: Sequence[int]) -> str:
    if not numbers:
        return "none"
    if len(numbers) > 10:
        return f"{numbers[0]}..{numbers[-1]} ({len(numbers)} in all)"
    return ", ".join(str(n) for n in numbers)


def version_record(name: str, row: VersionRow) -> VersionRecord:
    return VersionRecord(
        name=name,
        number=row.number,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        base_model=row.base_model,
        rank=row.rank,
        alpha=row.alpha,
        target_modules=tuple(row.target_modules),
        tags=dict(row.tags),
        lineage=dict(row.lineage),
        created_at=row.created_at,
        created_by=row.created_by,
    )


def alias_move(name: str, row: AliasEventRow) -> AliasMove:
    return AliasMove(
        name=name,
        alias=row.alias,
        kind=row.kind,
        from_version=row.from_version,
        to_version=row.to_version,
        actor=row.actor,
        reason=row.reason,
        at=row.at,
        # An "experiment" entry records an outcome without moving the alias.
        changed=row.from_version != row.to_version,
        details=dict(row.details) if row.details is not None else None,
    )


# --- experiments ------------------------------------------------------------------------------


def experiment_record(name: str, row: ExperimentRow) -> ExperimentRecord:
    return ExperimentRecord(
        id=row.id,
        name=name,
        status=row.status,
        salt=row.salt,
        hash_version=row.hash_version,
        variants=tuple(Variant(**v) for v in row.variants),
        ramp=tuple(row.ramp) if row.ramp is not None else None,
        step=row.step,
        step_started_at=row.step_started_at,
        config=dict(row.config),
        analysis=dict(row.analysis),
        decision=dict(row.decision),
        analysed_at=row.analysed_at,
        created_at=row.created_at,
        created_by=row.created_by,
        ended_at=row.ended_at,
        ended_by=row.ended_by,
        end_reason=row.end_reason,
    )


def get_experiment(session: Session, experiment_id: int) -> ExperimentRecord:
    found = session.exec(
        select(ExperimentRow, AdapterRow.name)
        .join(AdapterRow, AdapterRow.id == ExperimentRow.adapter_id)
        .where(ExperimentRow.id == experiment_id)
    ).first()
    if found is None:
        raise experiment_not_found(session, experiment_id)
    row, name = found
    return experiment_record(name, row)


def list_experiments(
    session: Session, *, name: str | None = None, running_only: bool = False
) -> list[ExperimentRecord]:
    """Experiments oldest first, of every name or one (AdapterNotFoundError if it is unknown)."""
    query = select(ExperimentRow, AdapterRow.name).join(
        AdapterRow, AdapterRow.id == ExperimentRow.adapter_id
    )
    if name is not None:
        query = query.where(ExperimentRow.adapter_id == get_adapter_row(session, name).id)
    if running_only:
        query = query.where(ExperimentRow.running_adapter_id.is_not(None))
    return [experiment_record(n, row) for row, n in session.exec(query.order_by(ExperimentRow.id))]


def find_running_experiment(session: Session, adapter: AdapterRow) -> ExperimentRow | None:
    return session.exec(
        select(ExperimentRow).where(ExperimentRow.running_adapter_id == adapter.id)
    ).first()


def experiment_not_found(session: Session, experiment_id: int) -> ExperimentNotFoundError:
    ids = list(session.exec(select(ExperimentRow.id).order_by(ExperimentRow.id)))
    known = f"experiments: {format_versions(ids)}" if ids else "no experiment has been started"
    return ExperimentNotFoundError(
        f"no experiment {experiment_id}; {known}. Start one: "
        "loraplex ab start NAME --control VERSION --candidate VERSION"
    )


def no_experiments(name: str) -> ExperimentNotFoundError:
    return ExperimentNotFoundError(
        f"{name} has no experiments; start one: "
        f"loraplex ab start {name} --control VERSION --candidate VERSION"
    )


def require_versions(session: Session, adapter: AdapterRow, wanted: Sequence[int]) -> None:
    numbers = version_numbers(session, adapter)
    missing = [v for v in wanted if v not in numbers]
    if missing:
        noun = "version" if len(missing) == 1 else "versions"
        raise VersionNotFoundError(
            f"{adapter.name} has no {noun} {', '.join(map(str, missing))}; "
            f"versions: {format_versions(numbers)}"
        )


def require_experiments(session: Session, ids: set[int]) -> None:
    found = set(session.exec(select(ExperimentRow.id).where(ExperimentRow.id.in_(ids))).all())
    for missing in sorted(ids - found):
        raise experiment_not_found(session, missing)


def exposure_counts(session: Session, experiment: ExperimentRecord) -> dict[int, int]:
    counts = dict(
        session.exec(
            select(ExperimentUserRow.variant, func.count())
            .where(ExperimentUserRow.experiment_id == experiment.id)
            .group_by(ExperimentUserRow.variant)
        ).all()
    )
    return {v.index: counts.get(v.index, 0) for v in experiment.variants}


def event_record(row: ExperimentEventRow) -> ExperimentEvent:
    return ExperimentEvent(
        id=row.id,
        experiment_id=row.experiment_id,
        kind=row.kind,
        step=row.step,
        actor=row.actor,
        reason=row.reason,
        details=dict(row.details),
        at=row.at,
    )


def _alias_not_found(session: Session, adapter: AdapterRow, alias: str) -> AliasNotFoundError:
    numbers = version_numbers(session, adapter)
    others = session.exec(select(AliasRow).where(AliasRow.adapter_id == adapter.id)).all()
    held = ", ".join(f"{a.alias} -> {a.version}" for a in sorted(others, key=lambda a: a.alias))
    flag = "" if alias == DEFAULT_ALIAS else f" --alias {alias}"
    return AliasNotFoundError(
        f"{adapter.name} has no alias {alias!r}"
        + (f" (aliases: {held})" if held else "")
        + f"; versions: {format_versions(numbers)}. Promote one: "
        f"loraplex registry promote {adapter.name} {numbers[-1] if numbers else 'VERSION'}{flag}"
    )
