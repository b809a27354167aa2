"""Artifact stores: where adapter archives live, content-addressed by sha256, chosen by URL scheme.

`ArtifactStore` is the one interface (file:// and s3:// implement it); it uploads a packed
folder and fetches one back, verified and unpacked atomically into a folder ready to serve.
It knows nothing about names or versions: the SQL store records which sha256 is which version.
Archives are never deleted on a request path: the same bytes may back a version that another
registration is committing right now. `registry.gc` deletes the unreferenced ones, after a grace
period measured from each archive's modification time (refreshed whenever bytes are re-stored).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from registry.archive import ARCHIVE_SUFFIX, pack_folder, unpack_archive, verify_file
from registry.errors import (
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    ArtifactStoreError,
    UnknownArtifactSchemeError,
)

KNOWN_SCHEMES = ("file://", "s3://")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class StoredArtifact:
    sha256: str
    size_bytes: int
    newly_stored: bool  # False when the same bytes were already there


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """One archive in a store, as a garbage sweep sees it."""

    sha256: str
    size_bytes: int
    modified: datetime  # aware, UTC


class ArtifactStore(ABC):
    """Blobs keyed by sha256. Subclasses move bytes; this class packs, verifies and unpacks."""

    url: str

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove the archive; only the garbage sweep (registry.gc) calls this."""

    @abstractmethod
    def touch(self, sha256: str) -> None:
        """Make the archive's modification time now, so a sweep's grace period starts over."""

    @abstractmethod
    def list_blobs(self) -> Iterator[StoredBlob]:
        """Every archive in the store (in no particular order)."""

    @abstractmethod
    def modified(self, sha256: str) -> datetime | None:
        """The archive's modification time, or None when it is not there."""

    def remove_stale_uploads(self, before: datetime, *, dry_run: bool = False) -> int:
        """Delete leftovers of uploads interrupted before `before`; how many there were."""
        return 0

    @abstractmethod
    def _upload(self, sha256: str, archive: Path) -> None: ...

    @abstractmethod
    def _download(self, sha256: str, dest: Path) -> None:
        """Write the stored bytes to `dest`; raise ArtifactNotFoundError when absent."""

    def upload_folder(self, folder: Path) -> StoredArtifact:
        """Pack `folder` deterministically and store it under its sha256 (once per content)."""
        with tempfile.TemporaryDirectory(prefix="loraplex-pack-") as tmp:
            packed = pack_folder(folder, Path(tmp) / f"adapter{ARCHIVE_SUFFIX}")
            if self.exists(packed.sha256):
                # These bytes may be an orphan about to be swept; a fresh mtime keeps them for
                # the grace period, time enough to commit the row that references them.
                self.touch(packed.sha256)
                return StoredArtifact(packed.sha256, packed.size_bytes, newly_stored=False)
            self._upload(packed.sha256, packed.path)
        return StoredArtifact(packed.sha256, packed.size_bytes, newly_stored=True)

    def fetch(self, sha256: str, dest_dir: Path) -> Path:
        """Download, verify and unpack artifact `sha256` into `dest_dir`; return `dest_dir`.

        `dest_dir` only ever appears complete (unpacked beside it, then renamed), so a
        non-empty `dest_dir` is returned as is and concurrent fetches of one folder are safe.
        On any failure nothing is left behind.
        """
        check_sha256(sha256)
        dest_dir = Path(dest_dir)
        if dest_dir.is_dir() and any(dest_dir.iterdir()):
            return dest_dir
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", dir=dest_dir.parent))
        try:
            archive = staging / f"{sha256}{ARCHIVE_SUFFIX}"
            self._download(sha256, archive)
            verify_file(archive, sha256=sha256)
            unpacked = staging / "adapter"
            unpacked.mkdir()
            unpack_archive(archive, unpacked)
            try:
                unpacked.rename(dest_dir)
            except OSError:
                if not (dest_dir.is_dir() and any(dest_dir.iterdir())):
                    raise
            return dest_dir
        except OSError as e:
            raise ArtifactStoreError(f"cannot fetch artifact {sha256} into {dest_dir}: {e}") from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class FileArtifactStore(ArtifactStore):
    """Archives under a local (or mounted) folder: ROOT/ab/abcdef....tar."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = self.root.resolve().as_uri()

    def _path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / sha256[:2] / f"{sha256}{ARCHIVE_SUFFIX}"

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def delete(self, sha256: str) -> None:
        try:
            self._path(sha256).unlink(missing_ok=True)
        except OSError as e:
            raise ArtifactStoreError(f"cannot delete artifact {sha256} in {self.root}: {e}") from e

    def touch(self, sha256: str) -> None:
        try:
            os.utime(self._path(sha256))
        except FileNotFoundError:
            pass  # swept meanwhile: the caller re-stores it after committing (service.py)
        except OSError as e:
            raise ArtifactStoreError(f"cannot touch artifact {sha256} in {self.root}: {e}") from e

    def list_blobs(self) -> Iterator[StoredBlob]:
        for path in sorted(self.root.glob(f"??/*{ARCHIVE_SUFFIX}")):
            sha256 = path.name.removesuffix(ARCHIVE_SUFFIX)
            if not _SHA256.match(sha256) or path.parent.name != sha256[:2]:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            yield StoredBlob(sha256, stat.st_size, _utc(stat.st_mtime))

    def modified(self, sha256: str) -> datetime | None:
        try:
            return _utc(self._path(sha256).stat().st_mtime)
        except FileNotFoundError:
            return None

    def remove_stale_uploads(self, before: datetime, *, dry_run: bool = False) -> int:
        stale = [p for p in self.root.glob("??/.upload-*") if _utc(p.stat().st_mtime) < before]
        if not dry_run:
            for path in stale:
                path.unlink(missing_ok=True)
        return len(stale)

    def _upload(self, sha256: str, archive: Path) -> None:
        target = self._path(sha256)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=target.parent)
            os.close(fd)
            shutil.copyfile(archive, tmp)
            os.replace(tmp, target)  # readers never see a half-written archive
        except OSError as e:
            raise ArtifactStoreError(f"cannot store artifact in {self.root}: {e}") from e

    def _download(self, sha256: str, dest: Path) -> None:
        source = self._path(sha256)
        if not source.is_file():
            raise ArtifactNotFoundError(f"artifact {sha256} is not in {self.url}")
        shutil.copyfile(source, dest)


class S3ArtifactStore(ArtifactStore):
    """Archives in an S3 bucket (or MinIO, moto: boto3 honours AWS_ENDPOINT_URL itself)."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3  # slow to import; only S3 users pay for it

            self._client = boto3.client("s3")
        return self._client

    def _key(self, sha256: str) -> str:
        check_sha256(sha256)
        name = f"{sha256}{ARCHIVE_SUFFIX}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def exists(self, sha256: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(sha256))
        except _boto_errors() as e:
            if _s3_error_code(e) in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise self._store_error("look up", sha256, e) from e
        return True

    def delete(self, sha256: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(sha256))
        except _boto_errors() as e:
            raise self._store_error("delete", sha256, e) from e

    def touch(self, sha256: str) -> None:
        # S3 has no utime: copying the object onto itself with new metadata is the documented
        # way to refresh LastModified.
        key = self._key(sha256)
        try:
            self.client.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": key},
                Metadata={"sha256": sha256},
                MetadataDirective="REPLACE",
            )
        except _boto_errors() as e:
            if _s3_error_code(e) in {"404", "NoSuchKey", "NotFound"}:
                return  # swept meanwhile: the caller re-stores it after committing
            raise self._store_error("touch", sha256, e) from e

    def list_blobs(self) -> Iterator[StoredBlob]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"].removeprefix(prefix)
                    sha256 = name.removesuffix(ARCHIVE_SUFFIX)
                    if name.endswith(ARCHIVE_SUFFIX) and _SHA256.match(sha256):
                        yield StoredBlob(sha256, item["Size"], item["LastModified"])
        except _boto_errors() as e:
            raise ArtifactStoreError(f"cannot list artifacts in {self.url}: {e}") from e

    def modified(self, sha256: str) -> datetime | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(sha256))
        except _boto_errors() as e:
            if _s3_error_code(e) in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise self._store_error("look up", sha256, e) from e
        return head["LastModified"]

    def _upload(self, sha256: str, archive: Path) -> None:
        extra = {"Metadata": {"sha256": sha256}, "ChecksumAlgorithm": "SHA256"}
        try:
            self.client.upload_file(str(archive), self.bucket, self._key(sha256), ExtraArgs=extra)
        except _boto_errors() as e:
            raise self._store_error("upload", sha256, e) from e

    def _download(self, sha256: str, dest: Path) -> None:
        try:
            self.client.download_file(self.bucket, self._key(sha256), str(dest))
        except _boto_errors() as e:
            if _s3_error_code(e) in {"404", "NoSuchKey", "NotFound"}:
                raise ArtifactNotFoundError(f"artifact {sha256} is not in {self.url}") from e
            raise self._store_error("download", sha256, e) from e

    def _store_error(self, action: str, sha256: str, error: Exception) -> ArtifactStoreError:
        return ArtifactStoreError(f"cannot {action} artifact {sha256} in {self.url}: {error}")


def open_artifact_store(url: str) -> ArtifactStore:
    """The store for `url`: `file:///path` (or a plain path) or `s3://bucket/prefix`."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UnknownArtifactSchemeError(f"file URL {url!r} names a host; use file:///path")
        return FileArtifactStore(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise UnknownArtifactSchemeError(
                f"S3 URL {url!r} names no bucket; use s3://bucket/prefix"
            )
        return S3ArtifactStore(parts.netloc, unquote(parts.path))
    if parts.scheme == "" and url:
        return FileArtifactStore(Path(url).expanduser())
    raise UnknownArtifactSchemeError(
        f"unknown artifact store scheme {parts.scheme!r} in {url!r}; known schemes: "
        + ", ".join(KNOWN_SCHEMES)
    )


def check_sha256(sha256: str) -> str:
    if not _SHA256.match(sha256):
        raise ArtifactIntegrityError(f"{sha256!r} is not a sha256 hex digest")
    return sha256


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _boto_errors() -> tuple[type[Exception], ...]:
    # Evaluated only while an exception is matched, so importing boto3 stays lazy.
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, Boto3Error)


def _s3_error_code(error: Exception) -> str | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code"))
    return None
