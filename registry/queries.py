"""Read queries on the metadata store, each given an open session: resolve references, list,
history and the routing snapshot. They return frozen records (records.py) and raise
*NotFoundError with a message that says what exists and how to get what was asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session, select

from registry.errors import AdapterNotFoundError, AliasNotFoundError, VersionNotFoundError
from registry.records import AdapterSummary, AliasMove, RoutingSnapshot, VersionRecord
from registry.refs import DEFAULT_ALIAS, AdapterRef, check_alias, parse_ref
from registry.tables import AdapterRow, AliasEventRow, AliasRow, RegistryStateRow, VersionRow

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
    return RoutingSnapshot(
        revision=state.revision,
        changed_at=state.changed_at,
        aliases={(name, alias): version for alias, version, name in names},
        latest=dict(latest),
    )


def current_revision(session: Session) -> int:
    return session.get(RegistryStateRow, 1).revision


def sha256_in_use(session: Session, sha256: str) -> bool:
    return (
        session.exec(select(VersionRow.id).where(VersionRow.sha256 == sha256)).first() is not None
    )


def referenced_sha256s(session: Session) -> set[str]:
    return set(session.exec(select(VersionRow.sha256).distinct()).all())


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
