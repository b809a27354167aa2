"""The registry as callers use it: a metadata store and an artifact store opened from settings.

`Registry.register` is the one path by which an adapter folder becomes a version: validate
(every problem at once, against the base model it will be served on), upload the archive, then
write the row, which is the commit point. A failed commit leaves the archive in place (other
registrations may be committing the same bytes); `sweep_orphans` deletes it after a grace
period. Reads and alias moves are the store's (`registry.store`), fetches the artifact store's
(`registry.artifacts`); this module only wires them together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from registry.artifacts import ArtifactStore, open_artifact_store
from registry.base_model import BaseModel, load_base_model
from registry.errors import AdapterRejectedError, ArtifactIntegrityError
from registry.gc import DEFAULT_GRACE_SECONDS, SweepReport, sweep_orphans
from registry.records import VersionRecord
from registry.refs import check_actor, check_name
from registry.settings import RegistrySettings
from registry.store import RegistryStore, VersionSpec, base_mismatch
from registry.validation import ADAPTER_CONFIG, AdapterManifest, validate_adapter_dir

DEFAULT_MAX_ADAPTER_BYTES = 2 * 1024**3
MAX_BASE_MODEL_CHARS = 512  # the base_model columns' width


class Registry:
    """Both stores plus the rules for admitting a new version."""

    def __init__(
        self,
        store: RegistryStore,
        artifacts: ArtifactStore,
        *,
        max_lora_rank: int = 16,
        base: BaseModel | None = None,
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.max_lora_rank = max_lora_rank
        self.base = base or load_base_model("smollm2", None, embedded=True)
        self.max_adapter_bytes = max_adapter_bytes

    @classmethod
    def open(cls, settings: RegistrySettings) -> Registry:
        """Open (and migrate) the database and the artifact store the settings name."""
        artifacts = open_artifact_store(settings.artifacts_url())
        base = load_base_model(
            settings.base_model,
            settings.base_model_folder(),
            embedded=settings.base_model_dir is None,
        )
        store = RegistryStore.open(settings.database_url())
        return cls(store, artifacts, max_lora_rank=settings.max_lora_rank, base=base)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def register(
        self,
        name: str,
        folder: Path,
        *,
        actor: str,
        tags: Mapping[str, str] | None = None,
        lineage: Mapping[str, Any] | None = None,
    ) -> VersionRecord:
        """Validate `folder`, store its archive, and record it as the next version of `name`.

        Raises AdapterRejectedError listing every problem; then nothing was stored.
        """
        check_name(name)
        check_actor(actor)
        folder = Path(folder)
        base_model, manifest = self._check(name, folder, tags=tags or {}, lineage=lineage or {})
        stored = self.artifacts.upload_folder(folder)
        spec = VersionSpec(
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            base_model=base_model,
            rank=manifest.rank,
            alpha=manifest.alpha,
            target_modules=manifest.target_modules,
            tags=dict(tags or {}),
            lineage=dict(lineage or {}),
            same_base=self.base.names,
        )
        # No cleanup on failure: deleting here could remove bytes that a concurrent registration
        # of the same content has just committed a row for. The sweep removes true orphans.
        version = self.store.add_version(name, spec, actor=actor)
        self._ensure_stored(version, folder)
        return version

    def sweep_orphans(
        self, *, grace_seconds: float = DEFAULT_GRACE_SECONDS, dry_run: bool = False
    ) -> SweepReport:
        """Delete archives no version references, older than `grace_seconds` (registry.gc)."""
        return sweep_orphans(
            self.store, self.artifacts, grace_seconds=grace_seconds, dry_run=dry_run
        )

    def fetch(self, version: VersionRecord, dest_dir: Path) -> Path:
        """Download `version`'s archive, verify its sha256 and unpack it into `dest_dir`."""
        return self.artifacts.fetch(version.sha256, dest_dir)

    def _ensure_stored(self, version: VersionRecord, folder: Path) -> None:
        """After the commit: if a sweep removed these bytes before the row existed (a sweep
        running longer than its grace period), store them again from the folder."""
        if self.artifacts.exists(version.sha256):
            return
        again = self.artifacts.upload_folder(folder)
        if again.sha256 != version.sha256:
            raise ArtifactIntegrityError(
                f"{version.ref}: {folder} changed while it was being registered "
                f"(now {again.sha256}); register it again"
            )

    def _check(
        self, name: str, folder: Path, *, tags: Mapping[str, str], lineage: Mapping[str, Any]
    ) -> tuple[str, AdapterManifest]:
        report = validate_adapter_dir(
            folder, max_rank=self.max_lora_rank, max_bytes=self.max_adapter_bytes, base=self.base
        )
        problems = list(report.problems)
        base_model = self.base.canonical(declared_base_model(folder))
        if len(base_model) > MAX_BASE_MODEL_CHARS:
            problems.append(f"base_model_name_or_path is over {MAX_BASE_MODEL_CHARS} characters")
            base_model = base_model[:MAX_BASE_MODEL_CHARS]
        expected = self.store.find_base_model(name)
        if expected is not None and not self.base.same(expected, base_model):
            problems.append(base_mismatch(name, declared=base_model, expected=expected))
        problems.extend(_metadata_problems(tags=tags, lineage=lineage))
        if problems or report.manifest is None:
            raise AdapterRejectedError(name, problems or ["the adapter could not be read"])
        return base_model, report.manifest


def declared_base_model(folder: Path) -> str | None:
    """`base_model_name_or_path` from the adapter config, if it can be read at all."""
    path = folder / ADAPTER_CONFIG
    try:
        if path.is_symlink() or not path.is_file():
            return None
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    value = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return value if isinstance(value, str) and value.strip() else None


def _metadata_problems(*, tags: Mapping[str, str], lineage: Mapping[str, Any]) -> list[str]:
    problems = [
        f"tag {key!r}={value!r} must be a non-empty string key with a string value"
        for key, value in tags.items()
        if not (isinstance(key, str) and key and isinstance(value, str))
    ]
    try:
        json.dumps(dict(lineage))
    except (TypeError, ValueError) as e:
        problems.append(f"lineage is not JSON-serialisable: {e}")
    return problems
