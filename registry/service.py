"""The registry as callers use it: a metadata store and an artifact store opened from settings.

`Registry.register` is the one path by which an adapter folder becomes a version: validate
(every problem at once, base model included), upload the archive, then write the row, which is
the commit point. Reads and alias moves are the store's (`registry.store`), fetches the
artifact store's (`registry.artifacts`); this module only wires them together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from registry.artifacts import ArtifactStore, open_artifact_store
from registry.errors import AdapterRejectedError
from registry.records import VersionRecord
from registry.refs import base_model_identity, check_name
from registry.settings import RegistrySettings
from registry.store import RegistryStore, VersionSpec, base_mismatch
from registry.validation import ADAPTER_CONFIG, AdapterManifest, validate_adapter_dir

DEFAULT_MAX_ADAPTER_BYTES = 2 * 1024**3


class Registry:
    """Both stores plus the rules for admitting a new version."""

    def __init__(
        self,
        store: RegistryStore,
        artifacts: ArtifactStore,
        *,
        max_lora_rank: int = 16,
        default_base_model: str = "smollm2",
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.max_lora_rank = max_lora_rank
        self.default_base_model = base_model_identity(default_base_model)
        self.max_adapter_bytes = max_adapter_bytes

    @classmethod
    def open(cls, settings: RegistrySettings) -> Registry:
        """Open (and migrate) the database and the artifact store the settings name."""
        artifacts = open_artifact_store(settings.artifacts_url())
        store = RegistryStore.open(settings.database_url())
        return cls(
            store,
            artifacts,
            max_lora_rank=settings.max_lora_rank,
            default_base_model=settings.base_model,
        )

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
        )
        try:
            return self.store.add_version(name, spec, actor=actor)
        except BaseException:
            # The row is the commit point: without it the upload is an orphan, unless another
            # version already holds the same bytes.
            if stored.newly_stored and not self.store.sha256_in_use(stored.sha256):
                self.artifacts.delete(stored.sha256)
            raise

    def fetch(self, version: VersionRecord, dest_dir: Path) -> Path:
        """Download `version`'s archive, verify its sha256 and unpack it into `dest_dir`."""
        return self.artifacts.fetch(version.sha256, dest_dir)

    def _check(
        self, name: str, folder: Path, *, tags: Mapping[str, str], lineage: Mapping[str, Any]
    ) -> tuple[str, AdapterManifest]:
        report = validate_adapter_dir(
            folder, max_rank=self.max_lora_rank, max_bytes=self.max_adapter_bytes
        )
        problems = list(report.problems)
        declared = declared_base_model(folder)
        base_model = base_model_identity(declared) if declared else self.default_base_model
        expected = self.store.find_base_model(name)
        if expected is not None and expected != base_model:
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
