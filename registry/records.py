"""What the registry hands out: frozen values detached from the database session, each with a
JSON form for `--json` and the admin API. Nothing here queries or writes anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from registry.experiment_records import ExperimentRecord


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One immutable adapter version; `ref` (NAME@NUMBER) is its serving identity."""

    name: str
    number: int
    sha256: str
    size_bytes: int
    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    tags: Mapping[str, str]
    lineage: Mapping[str, Any]
    created_at: datetime
    created_by: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.number}"

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "name": self.name,
            "version": self.number,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "base_model": self.base_model,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "tags": dict(self.tags),
            "lineage": dict(self.lineage),
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
        }


@dataclass(frozen=True, slots=True)
class AliasMove:
    """One entry of the alias-event log: `kind` is "promote", "rollback" or "experiment".

    An "experiment" entry records an experiment's outcome where the alias did not move
    (from = to); `details` says which experiment decided what (None for plain moves).
    """

    name: str
    alias: str
    kind: str
    from_version: int | None
    to_version: int
    actor: str
    reason: str
    at: datetime
    changed: bool = True
    details: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "alias": self.alias,
            "kind": self.kind,
            "from": self.from_version,
            "to": self.to_version,
            "actor": self.actor,
            "reason": self.reason,
            "at": self.at.isoformat(),
            "changed": self.changed,
            "details": dict(self.details) if self.details is not None else None,
        }


@dataclass(frozen=True, slots=True)
class AdapterSummary:
    """An adapter name with its versions (ascending) and aliases."""

    name: str
    base_model: str
    created_at: datetime
    versions: tuple[int, ...]
    aliases: Mapping[str, int] = field(default_factory=dict)

    @property
    def latest(self) -> int | None:
        return self.versions[-1] if self.versions else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base_model": self.base_model,
            "created_at": self.created_at.isoformat(),
            "versions": list(self.versions),
            "latest": self.latest,
            "aliases": dict(sorted(self.aliases.items())),
        }


@dataclass(frozen=True, slots=True)
class RoutingSnapshot:
    """Every alias, the newest version of every name and the running experiments (by adapter
    name), as of `revision`.

    `revision` grows with each committed registry change; a poller that sees the same revision
    twice can skip the rest. The revision is read before the rows, so the rows are never older
    than the revision they come with.
    """

    revision: int
    changed_at: datetime
    aliases: Mapping[tuple[str, str], int]
    latest: Mapping[str, int]
    experiments: Mapping[str, ExperimentRecord] = field(default_factory=dict)

    def find_alias(self, name: str, alias: str) -> int | None:
        return self.aliases.get((name, alias))

    def to_json(self) -> dict[str, Any]:
        aliases: dict[str, dict[str, int]] = {}
        for (name, alias), version in sorted(self.aliases.items()):
            aliases.setdefault(name, {})[alias] = version
        return {
            "revision": self.revision,
            "changed_at": self.changed_at.isoformat(),
            "aliases": aliases,
            "latest": dict(sorted(self.latest.items())),
            "experiments": {
                name: record.to_json() for name, record in sorted(self.experiments.items())
            },
        }
