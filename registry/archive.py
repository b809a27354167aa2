"""Adapter folder <-> one deterministic tar archive, named by its sha256.

Packing sorts entries and fixes mtimes, owners and modes, so the same files always give the
same bytes and the same sha256. Unpacking accepts only plain files and folders inside the
target (no links, devices, sparse files, absolute paths or `..`), a bounded number of entries
and of bytes; `gunzip_capped` decompresses with a cap, for archives a client uploads.
Transport and storage live in artifacts.py.
"""

from __future__ import annotations

import gzip
import hashlib
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from registry.errors import ArchiveTooLargeError, ArtifactIntegrityError

ARCHIVE_SUFFIX = ".tar"
# An adapter folder holds a config, weights and perhaps tokenizer files and a README.
DEFAULT_MAX_MEMBERS = 1000
DEFAULT_MAX_UNPACKED_BYTES = 2 * 1024**3 + 64 * 1024**2
_CHUNK = 1024 * 1024
_FILE_MODE = 0o644
_DIR_MODE = 0o755


@dataclass(frozen=True, slots=True)
class PackedArtifact:
    path: Path
    sha256: str
    size_bytes: int


def pack_folder(folder: Path, archive: Path) -> PackedArtifact:
    """Write `folder` as a deterministic tar at `archive`; symbolic links are refused."""
    with (
        archive.open("wb") as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for entry in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
            name = entry.relative_to(folder).as_posix()
            if entry.is_symlink():
                raise ArtifactIntegrityError(
                    f"{name} is a symbolic link; adapters hold plain files"
                )
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if entry.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, _DIR_MODE
                tar.addfile(info)
            elif entry.is_file():
                info.size, info.mode = entry.stat().st_size, _FILE_MODE
                with entry.open("rb") as f:
                    tar.addfile(info, f)
    return PackedArtifact(archive, sha256_of_file(archive), archive.stat().st_size)


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, *, sha256: str) -> None:
    """Raise ArtifactIntegrityError unless the file's sha256 is `sha256`."""
    actual = sha256_of_file(path)
    if actual != sha256:
        raise ArtifactIntegrityError(
            f"artifact {sha256} failed verification: its bytes hash to {actual} "
            "(corrupted or tampered in the store); nothing was unpacked"
        )


def unpack_archive(
    archive: Path,
    target: Path,
    *,
    max_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> None:
    """Extract into the existing empty folder `target`, refusing anything but files and folders,
    more than `max_members` entries, or more than `max_bytes` of file contents."""
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members: list[tarfile.TarInfo] = []
            total = 0
            for member in tar:  # headers one at a time: a huge member list is never built
                if len(members) == max_members:
                    raise ArtifactIntegrityError(f"archive has more than {max_members} entries")
                _check_member(member)
                total += member.size
                if total > max_bytes:
                    raise ArchiveTooLargeError(f"archive unpacks to more than {max_bytes} bytes")
                members.append(member)
            tar.extractall(target, members=members, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise ArtifactIntegrityError(f"cannot unpack artifact {archive.name}: {e}") from e


def is_gzip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == b"\x1f\x8b"


def gunzip_capped(source: Path, dest: Path, *, max_bytes: int) -> int:
    """Decompress gzip `source` into `dest`, stopping past `max_bytes`; the bytes written."""
    written = 0
    try:
        with gzip.open(source, "rb") as src, dest.open("wb") as out:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > max_bytes:
                    raise ArchiveTooLargeError(
                        f"the archive decompresses to more than {max_bytes} bytes"
                    )
                out.write(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise ArtifactIntegrityError(f"the archive is not valid gzip: {e}") from e
    return written


def _check_member(member: tarfile.TarInfo) -> None:
    path = PurePosixPath(member.name)
    if not (member.isfile() or member.isdir()) or member.issparse():
        raise ArtifactIntegrityError(f"archive entry {member.name!r} is not a plain file or folder")
    if path.is_absolute() or ".." in path.parts or "\\" in member.name or not member.name:
        raise ArtifactIntegrityError(f"archive entry {member.name!r} points outside the adapter")
