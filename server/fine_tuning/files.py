"""Uploaded files: bytes in the registry's artifact store (a one-file folder archive, keyed by
its sha256), metadata in the registry database, checked on upload with the trainer's validator
run as a subprocess (`loraplex data validate --json`: the server never imports the trainer)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from registry.artifacts import ArtifactStore

DATA_FILE = "data.jsonl"
VALIDATE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Validation:
    ok: bool
    details: str | None  # line-numbered problems, one per line
    kind: str | None = None  # chat or preference, as the validator read it


def store_bytes(artifacts: ArtifactStore, data: bytes) -> tuple[str, str]:
    """Store `data`; (its own sha256, the archive's sha256 the store keys it by)."""
    with tempfile.TemporaryDirectory(prefix="loraplex-file-") as tmp:
        folder = Path(tmp) / "file"
        folder.mkdir()
        (folder / DATA_FILE).write_bytes(data)
        stored = artifacts.upload_folder(folder)
    return hashlib.sha256(data).hexdigest(), stored.sha256


def fetch_file(artifacts: ArtifactStore, blob_sha256: str, dest_dir: Path) -> Path:
    """The stored file's bytes at dest_dir/data.jsonl."""
    return artifacts.fetch(blob_sha256, dest_dir) / DATA_FILE


def read_bytes(artifacts: ArtifactStore, blob_sha256: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="loraplex-file-") as tmp:
        return fetch_file(artifacts, blob_sha256, Path(tmp) / "file").read_bytes()


def validate_file(path: Path, *, val: Path | None = None) -> Validation:
    """`loraplex data validate PATH [--val VAL] --json` in a subprocess."""
    command = [sys.executable, "-m", "loraplex.cli", "data", "validate", str(path), "--json"]
    if val is not None:
        command += ["--val", str(val)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=VALIDATE_TIMEOUT_S)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return Validation(False, "the file could not be validated: " + " ".join(tail))
    problems = [
        f"line {p['line']}: {p['message']}" if p.get("line") is not None else p["message"]
        for p in report.get("problems", [])
    ]
    kind = (report.get("summary") or {}).get("kind")
    return Validation(not problems and report.get("ok", False), "\n".join(problems) or None, kind)
