"""Artifact stores over file:// and a real S3 API (moto's server over HTTP): deterministic
archives, verified round trips, tampered and hostile archives refused, scheme errors."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from hashlib import sha256
from pathlib import Path

import boto3
import pytest

from registry.archive import pack_folder
from registry.artifacts import (
    FileArtifactStore,
    S3ArtifactStore,
    open_artifact_store,
)
from registry.errors import (
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    ArtifactStoreError,
    UnknownArtifactSchemeError,
)
from registry.service import Registry
from registry.settings import RegistrySettings


def same_files(a: Path, b: Path) -> bool:
    def listing(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()
        }

    return listing(a) == listing(b)


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def test_packing_is_deterministic(make_adapter, tmp_path):
    folder = make_adapter()
    (folder / "notes").mkdir()
    (folder / "notes" / "README.md").write_text("trained on tickets")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    for path in copy.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))
    os.chmod(copy / "notes" / "README.md", 0o600)
    first = pack_folder(folder, tmp_path / "a.tar")
    second = pack_folder(copy, tmp_path / "b.tar")
    assert first.sha256 == second.sha256 == sha256((tmp_path / "a.tar").read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_round_trip_verifies_and_unpacks(kind, make_adapter, tmp_path, request):
    url = (tmp_path / "store").as_uri() if kind == "file" else request.getfixturevalue("s3_url")
    store = open_artifact_store(url)
    assert isinstance(store, FileArtifactStore if kind == "file" else S3ArtifactStore)
    folder = make_adapter()
    stored = store.upload_folder(folder)
    assert stored.newly_stored and store.exists(stored.sha256)
    assert not store.upload_folder(folder).newly_stored  # content-addressed: stored once
    dest = store.fetch(stored.sha256, tmp_path / "cache" / stored.sha256)
    assert same_files(folder, dest)
    assert store.fetch(stored.sha256, dest) == dest  # already there: returned as is
    assert leftovers(tmp_path / "cache", {stored.sha256}) == []


def test_registry_on_s3_and_postgres_or_sqlite(settings, s3_url, make_adapter, tmp_path):
    with Registry.open(settings.model_copy(update={"artifacts": s3_url})) as registry:
        folder = make_adapter()
        version = registry.register("s3", folder, actor="ana")
        bucket, prefix = s3_url.removeprefix("s3://").split("/", 1)
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
        assert keys == [f"{prefix}/{version.sha256}.tar"]
        assert same_files(folder, registry.fetch(version, tmp_path / "served"))


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_tampered_artifact_is_refused_and_nothing_is_left(kind, make_adapter, tmp_path, request):
    url = (tmp_path / "store").as_uri() if kind == "file" else request.getfixturevalue("s3_url")
    store = open_artifact_store(url)
    digest = store.upload_folder(make_adapter()).sha256
    forged = pack_folder(make_adapter(), tmp_path / "forged.tar").path.read_bytes()
    if kind == "file":
        (tmp_path / "store" / digest[:2] / f"{digest}.tar").write_bytes(forged)
    else:
        store.client.put_object(Bucket=store.bucket, Key=store._key(digest), Body=forged)
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(ArtifactIntegrityError, match=f"artifact {digest} failed verification"):
        store.fetch(digest, cache / digest)
    assert leftovers(cache, set()) == []


def test_missing_and_malformed_artifacts(tmp_path):
    store = FileArtifactStore(tmp_path / "store")
    with pytest.raises(ArtifactNotFoundError, match="is not in file://"):
        store.fetch("ab" * 32, tmp_path / "dest")
    with pytest.raises(ArtifactIntegrityError, match="not a sha256"):
        store.fetch("../../etc/passwd", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def hostile_tar(entries: list[tarfile.TarInfo]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info in entries:
            data = b"x" * info.size if info.isfile() else None
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _member(name: str, *, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, target, 3 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    "member",
    [
        _member("../escaped"),
        _member("/etc/escaped"),
        _member("a/../../escaped"),
        _member("link", kind=tarfile.SYMTYPE, target="/etc/passwd"),
        _member("hard", kind=tarfile.LNKTYPE, target="adapter_config.json"),
        _member("fifo", kind=tarfile.FIFOTYPE),
    ],
    ids=["dotdot", "absolute", "nested-dotdot", "symlink", "hardlink", "fifo"],
)
def test_archives_with_path_tricks_are_refused(member, tmp_path):
    data = hostile_tar([_member("adapter_config.json"), member])
    digest = sha256(data).hexdigest()
    store = FileArtifactStore(tmp_path / "store")
    (tmp_path / "store" / digest[:2]).mkdir(parents=True)
    (tmp_path / "store" / digest[:2] / f"{digest}.tar").write_bytes(data)
    cache = tmp_path / "deep" / "cache"
    cache.mkdir(parents=True)
    with pytest.raises(ArtifactIntegrityError):
        store.fetch(digest, cache / digest)
    assert leftovers(cache, set()) == []
    assert not (tmp_path / "deep" / "escaped").exists() and not (tmp_path / "escaped").exists()


def test_unknown_schemes_list_the_known_ones(tmp_path):
    with pytest.raises(UnknownArtifactSchemeError, match=r"'gs'.*known schemes: file://, s3://"):
        open_artifact_store("gs://bucket/adapters")
    with pytest.raises(UnknownArtifactSchemeError, match="names no bucket"):
        open_artifact_store("s3:///adapters")
    assert isinstance(open_artifact_store(str(tmp_path)), FileArtifactStore)
    settings = RegistrySettings(home=tmp_path, artifacts="ftp://host/x")
    with pytest.raises(UnknownArtifactSchemeError):
        Registry.open(settings)


def test_a_missing_bucket_is_a_store_error(s3_url, make_adapter):
    store = open_artifact_store("s3://no-such-bucket-here/adapters")
    with pytest.raises(ArtifactStoreError, match="no-such-bucket-here"):
        store.upload_folder(make_adapter())
