"""No committed version ever points at a deleted archive: registrations never delete archives
(identical bytes are shared), and the orphan sweep deletes only archives that no row references
and that are older than its grace period. Real SQLite and PostgreSQL, file and S3 (moto over HTTP)
stores, real threads."""

from __future__ import annotations

import os
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from registry.gc import sweep_orphans
from registry.service import Registry

TWO_HOURS = 7200


@pytest.fixture(params=["file", "s3"])
def any_registry(request, settings):
    """A registry on this test's database and a file:// or s3:// artifact store."""
    if request.param == "s3":
        settings = settings.model_copy(update={"artifacts": request.getfixturevalue("s3_url")})
    with Registry.open(settings) as registry:
        yield registry


def age(registry: Registry, sha256: str, seconds: float) -> None:
    """Make a file:// archive look `seconds` old."""
    path = registry.artifacts._path(sha256)
    then = time.time() - seconds
    os.utime(path, (then, then))


def run_in_thread(target, *args, **kwargs) -> tuple[threading.Thread, list]:
    outcome: list = []

    def body():
        try:
            outcome.append(target(*args, **kwargs))
        except Exception as e:  # the outcome is what the test inspects
            outcome.append(e)

    thread = threading.Thread(target=body)
    thread.start()
    return thread, outcome


def test_a_failed_registration_never_deletes_bytes_a_concurrent_one_commits(
    any_registry, make_adapter, tmp_path, monkeypatch
):
    """B uploads, A finds the same bytes stored, B's commit fails, then A commits."""
    registry = any_registry
    first = make_adapter(name="first")
    twin = tmp_path / "twin"
    shutil.copytree(first, twin)  # identical bytes: one content-addressed archive
    b_stored, a_stored, b_done = threading.Event(), threading.Event(), threading.Event()
    upload, add_version = registry.artifacts.upload_folder, registry.store.add_version

    def ordered_upload(folder):
        if folder == first:
            assert b_stored.wait(30)
        stored = upload(folder)
        (b_stored if folder == twin else a_stored).set()
        return stored

    def ordered_add_version(name, spec, *, actor):
        if name == "b":
            assert a_stored.wait(30)
            raise RuntimeError("the database went away during B's commit")
        assert b_done.wait(30)
        return add_version(name, spec, actor=actor)

    monkeypatch.setattr(registry.artifacts, "upload_folder", ordered_upload)
    monkeypatch.setattr(registry.store, "add_version", ordered_add_version)
    thread_a, a = run_in_thread(registry.register, "a", first, actor="t")
    thread_b, b = run_in_thread(registry.register, "b", twin, actor="t")
    thread_b.join(30)
    b_done.set()
    thread_a.join(30)
    assert isinstance(b[0], RuntimeError) and a[0].ref == "a@1"
    assert registry.artifacts.exists(a[0].sha256)
    fetched = registry.fetch(a[0], tmp_path / "served")
    assert (fetched / "adapter_config.json").read_bytes() == (
        first / "adapter_config.json"
    ).read_bytes()


def test_concurrent_identical_registrations_all_keep_their_bytes(
    any_registry, make_adapter, tmp_path, monkeypatch
):
    registry = any_registry
    source = make_adapter(name="source")
    folders = []
    for i in range(8):
        folders.append(tmp_path / f"copy{i}")
        shutil.copytree(source, folders[-1])
    add_version = registry.store.add_version
    start = threading.Barrier(len(folders))

    def flaky_add_version(name, spec, *, actor):
        if name.endswith(("1", "3", "5", "7")):
            raise RuntimeError("forced failure after the upload")
        return add_version(name, spec, actor=actor)

    def register(i):
        start.wait(30)
        return registry.register(f"n{i}", folders[i], actor="t")

    monkeypatch.setattr(registry.store, "add_version", flaky_add_version)
    threads = [run_in_thread(register, i) for i in range(len(folders))]
    for thread, _ in threads:
        thread.join(60)
    outcomes = [outcome[0] for _, outcome in threads]
    committed = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(committed) == 4 and all(isinstance(o, RuntimeError) for o in outcomes[1::2])
    for version in committed:
        assert registry.artifacts.exists(version.sha256)
        assert registry.store.get_version(version.name, 1).sha256 == version.sha256
    report = registry.sweep_orphans(grace_seconds=0)
    assert (report.removed, report.kept_referenced) == ([], 1)
    assert registry.artifacts.exists(committed[0].sha256)


def test_the_sweep_removes_only_unreferenced_archives_past_the_grace_period(
    any_registry, make_adapter, monkeypatch
):
    registry = any_registry
    kept = registry.register("kept", make_adapter(), actor="t")
    add_version = registry.store.add_version
    monkeypatch.setattr(registry.store, "add_version", _fail)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            registry.register("lost", make_adapter(), actor="t")
    monkeypatch.setattr(registry.store, "add_version", add_version)
    orphans = [b.sha256 for b in registry.artifacts.list_blobs() if b.sha256 != kept.sha256]
    assert len(orphans) == 2

    young = sweep_orphans(registry.store, registry.artifacts, grace_seconds=3600)
    assert (young.removed, young.kept_recent, young.kept_referenced) == ([], 2, 1)
    later = datetime.now(UTC) + timedelta(seconds=TWO_HOURS)
    dry = sweep_orphans(
        registry.store, registry.artifacts, grace_seconds=3600, dry_run=True, now=later
    )
    assert sorted(b.sha256 for b in dry.removed) == sorted(orphans)
    assert all(registry.artifacts.exists(sha) for sha in orphans)  # a dry run deletes nothing
    swept = sweep_orphans(registry.store, registry.artifacts, grace_seconds=3600, now=later)
    assert sorted(b.sha256 for b in swept.removed) == sorted(orphans)
    assert swept.removed_bytes == sum(b.size_bytes for b in dry.removed) > 0
    assert [b.sha256 for b in registry.artifacts.list_blobs()] == [kept.sha256]


def test_re_storing_bytes_restarts_their_grace_period(registry, make_adapter, monkeypatch):
    folder = make_adapter()
    monkeypatch.setattr(registry.store, "add_version", _fail)
    with pytest.raises(RuntimeError):
        registry.register("late", folder, actor="t")
    sha256 = next(registry.artifacts.list_blobs()).sha256
    age(registry, sha256, TWO_HOURS)
    registry.artifacts.upload_folder(folder)  # what a new registration of these bytes does
    assert registry.sweep_orphans(grace_seconds=3600).kept_recent == 1
    assert registry.artifacts.exists(sha256)


def test_a_registration_during_a_sweep_keeps_its_bytes(registry, make_adapter, monkeypatch):
    """The sweep listed an old orphan and read the references; then the same bytes were
    registered (touched, committed) before it got to delete them."""
    folder = make_adapter()
    monkeypatch.setattr(registry.store, "add_version", _fail)
    with pytest.raises(RuntimeError):
        registry.register("r", folder, actor="t")
    monkeypatch.undo()
    sha256 = next(registry.artifacts.list_blobs()).sha256
    age(registry, sha256, TWO_HOURS)
    referenced = registry.store.referenced_sha256s
    versions = []

    def references_then_registration():
        seen = referenced()
        versions.append(registry.register("r", folder, actor="t"))
        return seen

    monkeypatch.setattr(registry.store, "referenced_sha256s", references_then_registration)
    report = registry.sweep_orphans(grace_seconds=3600)
    assert report.removed == [] and registry.artifacts.exists(versions[0].sha256)


def test_bytes_swept_before_the_commit_are_stored_again(registry, make_adapter, monkeypatch):
    folder = make_adapter()
    add_version = registry.store.add_version

    def swept_then_committed(name, spec, *, actor):
        registry.artifacts.delete(spec.sha256)  # a sweep that outran its grace period
        return add_version(name, spec, actor=actor)

    monkeypatch.setattr(registry.store, "add_version", swept_then_committed)
    version = registry.register("resilient", folder, actor="t")
    assert registry.artifacts.exists(version.sha256)


def test_the_sweep_removes_interrupted_uploads(registry, artifacts_root):
    stale = artifacts_root / "ab" / ".upload-abc123"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    assert registry.sweep_orphans(grace_seconds=3600).stale_uploads == 0
    then = time.time() - TWO_HOURS
    os.utime(stale, (then, then))
    assert registry.sweep_orphans(grace_seconds=3600, dry_run=True).stale_uploads == 1
    assert stale.exists()
    assert registry.sweep_orphans(grace_seconds=3600).stale_uploads == 1
    assert not stale.exists()


def test_registry_gc_command(registry, settings, make_adapter, monkeypatch):
    registry.register("kept", make_adapter(), actor="t")
    monkeypatch.setattr(registry.store, "add_version", _fail)
    with pytest.raises(RuntimeError):
        registry.register("lost", make_adapter(), actor="t")
    orphan = next(
        b for b in registry.artifacts.list_blobs() if not registry.store.sha256_in_use(b.sha256)
    )
    stores = ["--registry", settings.database_url(), "--artifacts", settings.artifacts_url()]
    runner = CliRunner()

    def gc(*args):
        return runner.invoke(app, ["registry", "gc", *args, *stores])

    young = gc("--json")
    assert young.exit_code == 0, young.output
    assert young.stdout and '"removed": []' in young.stdout
    dry = gc("--grace-seconds", "0", "--dry-run")
    assert dry.stdout.startswith("would remove 1 unreferenced archive(s)")
    assert orphan.sha256 in dry.stdout and registry.artifacts.exists(orphan.sha256)
    done = gc("--grace-seconds", "0")
    assert done.exit_code == 0 and done.stdout.startswith("removed 1 unreferenced archive(s)")
    assert not registry.artifacts.exists(orphan.sha256)
    bad = gc("--grace-seconds", "-1")
    assert bad.exit_code == 2


def _fail(*args, **kwargs):
    raise RuntimeError("forced failure after the upload")
