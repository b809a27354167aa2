"""`loraplex registry ...`: parse flags, build RegistrySettings, call one registry function, print.

Every expected failure prints one line `error: ...` on stderr and exits 2 (the request) or 1
(the database or artifact store, unreachable ones included: RegistryUnavailableError). `--json` prints machine-readable results on stdout. The
registry itself is imported when a command runs, so `loraplex --help` stays quick.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from pydantic import ValidationError

from registry.errors import RegistryError, RegistryUserError

if TYPE_CHECKING:
    from registry.records import AliasMove, VersionRecord
    from registry.service import Registry

EXIT_USER_ERROR = 2
EXIT_SERVICE_ERROR = 1

app = typer.Typer(
    help="Adapter versions and aliases: register, promote, roll back, inspect.",
    no_args_is_help=True,
)

RegistryOpt = Annotated[
    str | None, typer.Option("--registry", help="database URL [env LORAPLEX_REGISTRY]")
]
ArtifactsOpt = Annotated[
    str | None, typer.Option("--artifacts", help="artifact store URL [env LORAPLEX_ARTIFACTS]")
]
HomeOpt = Annotated[Path | None, typer.Option("--home", help="data dir [env LORAPLEX_HOME]")]
ActorOpt = Annotated[str | None, typer.Option("--actor", help="who acts [the OS user]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
AliasOpt = Annotated[str, typer.Option("--alias", help="the alias to move")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="why (kept in the alias history)")]


def fail(message: str, *, code: int = EXIT_USER_ERROR) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def opened_registry(
    *, home: Path | None, registry: str | None, artifacts: str | None
) -> Iterator[Registry]:
    """The registry the flags (else LORAPLEX_* variables, else defaults) name; errors -> exit."""
    from registry.service import Registry

    flags = {"home": home, "registry": registry, "artifacts": artifacts}
    settings = _settings(flags)
    try:
        with Registry.open(settings) as opened:
            yield opened
    except RegistryError as e:
        code = EXIT_USER_ERROR if isinstance(e, RegistryUserError) else EXIT_SERVICE_ERROR
        fail(" ".join(str(e).split()), code=code)


def default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def parse_tags(values: list[str], *, flag: str = "--tag") -> dict[str, str]:
    tags: dict[str, str] = {}
    for value in values:
        key, sep, tag = value.partition("=")
        if not sep or not key.strip():
            fail(f"{flag} expects KEY=VALUE, got {value!r}")
        tags[key.strip()] = tag
    return tags


def emit(data: Any, text: str, *, as_json: bool) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else text)


@app.command()
def register(
    name: Annotated[str, typer.Argument(help="adapter name")],
    path: Annotated[Path, typer.Argument(help="PEFT LoRA adapter folder")],
    tag: Annotated[list[str] | None, typer.Option("--tag", help="KEY=VALUE (repeatable)")] = None,
    promote: Annotated[bool, typer.Option("--promote", help="then point production at it")] = False,
    reason: ReasonOpt = "",
    json_output: JsonOpt = False,
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
    actor: ActorOpt = None,
) -> None:
    """Validate an adapter folder and store it as NAME's next version; print NAME@VERSION."""
    tags = parse_tags(tag or [])
    who = actor or default_actor()
    with opened_registry(home=home, registry=registry, artifacts=artifacts) as reg:
        from rich.console import Console

        # A spinner on stderr while a large archive uploads; silent when not on a terminal.
        with Console(stderr=True).status(f"Validating and storing {path} as {name}..."):
            version = reg.register(name, path, actor=who, tags=tags)
        move = (
            reg.store.promote(name, version.number, actor=who, reason=reason or "registered")
            if promote
            else None
        )
    data = version.to_json() | ({"promoted": move.to_json()} if move else {})
    text = version.ref + (f"\n{describe_move(move)}" if move else "")
    emit(data, text, as_json=json_output)


@app.command("promote")
def promote_command(
    name: Annotated[str, typer.Argument(help="adapter name")],
    version: Annotated[int, typer.Argument(help="version number")],
    alias: AliasOpt = "production",
    reason: ReasonOpt = "",
    json_output: JsonOpt = False,
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
    actor: ActorOpt = None,
) -> None:
    """Point NAME's alias (production unless --alias) at VERSION."""
    with opened_registry(home=home, registry=registry, artifacts=artifacts) as reg:
        move = reg.store.promote(
            name, version, alias=alias, actor=actor or default_actor(), reason=reason
        )
    emit(move.to_json(), describe_move(move), as_json=json_output)


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="adapter name")],
    alias: AliasOpt = "production",
    reason: ReasonOpt = "",
    json_output: JsonOpt = False,
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
    actor: ActorOpt = None,
) -> None:
    """Move NAME's alias back to the version it held before its last promotion."""
    with opened_registry(home=home, registry=registry, artifacts=artifacts) as reg:
        move = reg.store.rollback(name, alias=alias, actor=actor or default_actor(), reason=reason)
    emit(move.to_json(), describe_move(move), as_json=json_output)


@app.command("list")
def list_command(
    json_output: JsonOpt = False,
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
) -> None:
    """Every adapter name with its versions and aliases."""
    with opened_registry(home=home, registry=registry, artifacts=artifacts) as reg:
        adapters = reg.store.list_adapters()
    if json_output:
        emit([a.to_json() for a in adapters], "", as_json=True)
        return
    rows = [
        (a.name, a.base_model, str(a.latest or "-"), len(a.versions), _aliases_text(a.aliases))
        for a in adapters
    ]
    print_table(("name", "base model", "latest", "versions", "aliases"), rows, empty="no adapters")


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS")],
    json_output: JsonOpt = False,
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
) -> None:
    """One version: what it is, where it came from, which aliases point at it."""
    with opened_registry(home=home, registry=registry, artifacts=artifacts) as reg:
        version = reg.store.resolve(ref)
        aliases = reg.store.get_adapter(version.name).aliases
        evaluations = reg.store.evaluations.list(version.name, version.number)
    held = sorted(a for a, v in aliases.items() if v == version.number)
    data = version.to_json() | {"aliases": held, "evaluations": [e.to_json() for e in evaluations]}
    text = describe_version(version, held)
    if evaluations:
        from registry.evaluations import summary_line

        latest = evaluations[-1]
        text += f"\n{'evaluation:':<16}{summary_line(latest)}"
        text += f"\n{'':<16}({len(evaluations)} in all; latest {latest.created_at.isoformat()})"
    emit(data, text, as_json=json_output)


@app.command()
def history(
    name: Annotated[str, typer.Argument(help="adapter name")],
    alias: Annotated[str | None, typer.Option("--alias", help="only this alias")] = None,
    json_output: JsonOpt = False,
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
) -> None:
    """Every alias move of NAME, oldest first: from, to, who, why, when."""
    with opened_registry(home=home, registry=registry, artifacts=artifacts) as reg:
        moves = reg.store.history(name, alias=alias)
    if json_output:
        emit([m.to_json() for m in moves], "", as_json=True)
        return
    rows = [
        (
            m.at.strftime("%Y-%m-%d %H:%M:%S"),
            m.alias,
            m.kind,
            f"{m.from_version or '-'} -> {m.to_version}",
            m.actor,
            m.reason + details_suffix(m.details),
        )
        for m in moves
    ]
    print_table(("at (UTC)", "alias", "kind", "move", "actor", "reason"), rows, empty="no moves")


@app.command()
def gc(
    grace_seconds: Annotated[
        float,
        typer.Option("--grace-seconds", min=0, help="keep unreferenced archives younger than this"),
    ] = 3600,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list, delete nothing")] = False,
    json_output: JsonOpt = False,
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
) -> None:
    """Delete archives that no version references (failed or abandoned registrations)."""
    with opened_registry(home=home, registry=registry, artifacts=artifacts) as reg:
        report = reg.sweep_orphans(grace_seconds=grace_seconds, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    lines = [
        f"{verb} {len(report.removed)} unreferenced archive(s), {report.removed_bytes} bytes; "
        f"kept {report.kept_referenced} in use and {report.kept_recent} younger than "
        f"{grace_seconds:g} s"
    ]
    lines += [f"  {blob.sha256} {blob.size_bytes} bytes" for blob in report.removed]
    emit(report.to_json(), "\n".join(lines), as_json=json_output)


@app.command()
def migrate(
    check: Annotated[
        bool,
        typer.Option(
            "--check", help="change nothing; exit 0 only if this release can use it as is"
        ),
    ] = False,
    json_output: JsonOpt = False,
    registry: RegistryOpt = None,
    home: HomeOpt = None,
) -> None:
    """Upgrade the registry schema to this release's (run before servers roll); idempotent."""
    from registry import db

    flags = {"home": home, "registry": registry}
    settings = _settings(flags)
    try:
        engine = db.create_registry_engine(settings.database_url())
        try:
            with db.database_errors(f"at {db.safe_url(engine)}"):
                if check:
                    state = db.schema_state(engine)
                    result = db.Migration(state, state)
                else:
                    result = db.migrate(engine)
        finally:
            engine.dispose()
    except RegistryError as e:
        fail(" ".join(str(e).split()), code=EXIT_SERVICE_ERROR)
    data = result.to_json() | {"database": db.safe_url(engine)}
    emit(data, describe_migration(result), as_json=json_output)
    if check and result.after.status == "incompatible":
        fail(result.after.refusal(), code=EXIT_SERVICE_ERROR)
    if check and result.after.status == "behind":
        raise typer.Exit(EXIT_SERVICE_ERROR)


def describe_migration(result: Any) -> str:
    """`registry schema 0003 -> 0004`, or why nothing changed."""
    from registry import db

    before, after = result.before, result.after
    if result.changed:
        return f"registry schema {before.revision or '(empty)'} -> {after.revision}"
    if after.status == "newer":
        return (
            f"registry schema {after.revision} is newer than this release's and readable by it "
            f"(min reader {after.min_reader}); nothing to do"
        )
    if after.status == "current":
        return f"registry schema {after.revision}: up to date"
    if after.status == "behind":
        return f"registry schema {after.revision or '(empty)'}: needs migrating to {db.SCHEMA_HEAD}"
    return f"registry schema {after.revision}: not usable by this release"


def details_suffix(details: Mapping[str, Any] | None) -> str:
    """` (experiment 3: promote)` for a move an experiment decided; "" for a plain one."""
    if not details or "experiment" not in details:
        return ""
    decision = details.get("decision")
    if isinstance(decision, Mapping):
        decision = decision.get("action") or decision.get("outcome")
    said = decision if isinstance(decision, str) else details.get("status")
    return f" (experiment {details['experiment']}" + (f": {said})" if said else ")")


def describe_move(move: AliasMove) -> str:
    target = f"{move.name}@{move.alias} -> {move.to_version}"
    if move.kind == "experiment":
        return f"{target} (kept){details_suffix(move.details)}"
    if not move.changed:
        return f"{target} (unchanged)"
    if move.kind == "rollback":
        return f"{target} (rolled back from {move.from_version})"
    return f"{target} (was {move.from_version if move.from_version is not None else 'unset'})"


def describe_version(version: VersionRecord, aliases: list[str]) -> str:
    lines = {
        "version": version.ref,
        "aliases": ", ".join(aliases) or "-",
        "base model": version.base_model,
        "rank": f"{version.rank} (alpha {version.alpha:g})",
        "target modules": ", ".join(version.target_modules),
        "sha256": version.sha256,
        "size": f"{version.size_bytes} bytes",
        "created": f"{version.created_at.isoformat()} by {version.created_by}",
        "tags": ", ".join(f"{k}={v}" for k, v in sorted(version.tags.items())) or "-",
    }
    if version.lineage:
        lines["lineage"] = json.dumps(dict(version.lineage), sort_keys=True)
    return "\n".join(f"{key + ':':<16}{value}" for key, value in lines.items())


def print_table(headers: tuple[str, ...], rows: list[tuple[Any, ...]], *, empty: str) -> None:
    if not rows:
        typer.echo(empty)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers, box=None, pad_edge=False)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console(soft_wrap=True).print(table)


def _aliases_text(aliases: Mapping[str, int]) -> str:
    return ", ".join(f"{a}->{v}" for a, v in sorted(aliases.items())) or "-"


def _settings(flags: dict) -> RegistrySettings:  # noqa: F821 - imported lazily
    """Registry settings from the flags given (else LORAPLEX_* variables); a bad value -> exit."""
    from registry.settings import RegistrySettings

    try:
        return RegistrySettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in e.errors())
        fail(f"invalid setting: {problems}")
