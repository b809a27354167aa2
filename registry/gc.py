"""The orphan sweep: delete archives no version row references, once they are older than a grace
period. This is the only place archives are deleted.

Registration uploads (or, for bytes already stored, touches) the archive before committing the
row that references it, so an archive younger than the grace period may belong to a
registration still in flight and is kept. Blobs are listed before the references are read, and
each candidate is checked again (age, then reference) just before it is deleted; a registration
also re-stores its bytes if they vanished before its row committed (service.py). Ages compare
the store's clock (S3's LastModified) with this machine's: keep the grace period far above any
clock skew and any registration's duration (the default is an hour).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from registry.artifacts import ArtifactStore, StoredBlob
from registry.store import RegistryStore

DEFAULT_GRACE_SECONDS = 3600


@dataclass(slots=True)
class SweepReport:
    """What a sweep removed (or, with dry_run, would remove) and what it kept."""

    grace_seconds: float
    dry_run: bool
    removed: list[StoredBlob] = field(default_factory=list)
    kept_referenced: int = 0
    kept_recent: int = 0
    stale_uploads: int = 0

    @property
    def removed_bytes(self) -> int:
        return sum(blob.size_bytes for blob in self.removed)

    def to_json(self) -> dict:
        return {
            "dry_run": self.dry_run,
            "grace_seconds": self.grace_seconds,
            "removed": [
                {"sha256": b.sha256, "size_bytes": b.size_bytes, "modified": b.modified.isoformat()}
                for b in self.removed
            ],
            "removed_bytes": self.removed_bytes,
            "kept_referenced": self.kept_referenced,
            "kept_recent": self.kept_recent,
            "stale_uploads": self.stale_uploads,
        }


def sweep_orphans(
    store: RegistryStore,
    artifacts: ArtifactStore,
    *,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    dry_run: bool = False,
    now: datetime | None = None,
) -> SweepReport:
    """Delete every archive that no version references and that is older than `grace_seconds`."""
    if grace_seconds < 0:
        raise ValueError(f"grace_seconds must be >= 0, got {grace_seconds}")
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=grace_seconds)
    report = SweepReport(grace_seconds=grace_seconds, dry_run=dry_run)
    blobs = list(artifacts.list_blobs())  # before the references: see the module docstring
    referenced = store.referenced_sha256s()
    for blob in blobs:
        if blob.sha256 in referenced:
            report.kept_referenced += 1
        elif blob.modified > cutoff:
            report.kept_recent += 1
        elif dry_run:
            report.removed.append(blob)
        elif _still_orphaned(store, artifacts, blob.sha256, cutoff=cutoff):
            artifacts.delete(blob.sha256)
            report.removed.append(blob)
        else:
            report.kept_recent += 1
    report.stale_uploads = artifacts.remove_stale_uploads(cutoff, dry_run=dry_run)
    return report


def _still_orphaned(
    store: RegistryStore, artifacts: ArtifactStore, sha256: str, *, cutoff: datetime
) -> bool:
    """Re-checked right before deleting: a registration may have touched or claimed it since."""
    modified = artifacts.modified(sha256)
    if modified is None or modified > cutoff:
        return False
    return not store.sha256_in_use(sha256)
