"""Download: adapter artifacts from the registry's artifact store onto local disk.

One folder per sha256 under the cache root, verified on the way in (the artifact store checks
the digest before it unpacks), least recently used folders evicted beyond a byte budget.
`acquire` hands a folder out pinned, the pin taken in the same critical section that makes the
folder visible, so no eviction can remove a folder between its download and its load: vLLM may
reload an adapter from its path at any time, and a missing path inside `generate` would kill
the engine (see `server.engine_vllm`). Pinned folders stay even beyond the budget. Blocking:
callers run it in a worker thread; one download per sha256 at a time.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from registry.artifacts import ArtifactStore
from registry.errors import ArtifactError
from registry.fine_tuning import CheckpointRecord
from registry.records import VersionRecord
from server.errors import AdapterUnavailableError
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

_TRASH_PREFIX = ".evicted-"  # renamed here under the lock, deleted outside it


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# What can be served: a registry version, or a fine-tuning job's uploaded checkpoint (its adapter
# is a folder inside the blob). Both have a `ref` (the serving identity) and a `sha256` (the blob).
Servable = VersionRecord | CheckpointRecord


class AdapterDiskCache:
    def __init__(
        self, root: Path, *, artifacts: ArtifactStore, max_bytes: int, metrics: ServerMetrics
    ):
        self._root = root
        self._artifacts = artifacts
        self._max_bytes = max_bytes
        self._metrics = metrics
        self._lock = threading.Lock()  # guards _sizes and _pins; never held across a download
        self._fetching: dict[str, threading.Lock] = {}  # sha256 -> single-flight download
        self._sizes: OrderedDict[str, int] = OrderedDict()  # sha256 -> bytes, oldest first
        self._pins: dict[str, int] = {}
        root.mkdir(parents=True, exist_ok=True)
        for folder in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime):
            if folder.name.startswith(_TRASH_PREFIX):
                shutil.rmtree(folder, ignore_errors=True)
            elif folder.is_dir() and not folder.name.startswith("."):
                self._sizes[folder.name] = _folder_bytes(folder)
        self._metrics.adapter_cache_bytes.set(self.total_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def contains(self, sha256: str) -> bool:
        return sha256 in self._sizes

    def acquire(self, version: Servable) -> Path:
        """The local folder of `version`, downloaded if needed, pinned: pair with `unpin`.
        Raises `AdapterUnavailableError` when it is not here and the artifact store cannot
        provide it (nothing is pinned then)."""
        with self._lock:
            single_flight = self._fetching.setdefault(version.sha256, threading.Lock())
        with single_flight:
            folder = self._root / version.sha256
            if self._pin_cached(version.sha256, folder):
                self._metrics.adapter_cache.labels(version.ref, "hit").inc()
                return folder
            self._metrics.adapter_cache.labels(version.ref, "miss").inc()
            try:
                self._artifacts.fetch(version.sha256, folder)
            except ArtifactError as e:
                raise AdapterUnavailableError(
                    f"Adapter {version.ref} is not cached on this server and could not be "
                    f"downloaded: {e}",
                    adapter=version.ref,
                ) from e
            size = _folder_bytes(folder)
            with self._lock:
                self._sizes[version.sha256] = size
                self._sizes.move_to_end(version.sha256)
                self._pins[version.sha256] = self._pins.get(version.sha256, 0) + 1
                trash = self._evict()
        self._empty(trash)
        return folder

    def _pin_cached(self, sha256: str, folder: Path) -> bool:
        with self._lock:
            if sha256 not in self._sizes:
                return False
            if not folder.is_dir():  # removed behind our back: fetch it again
                del self._sizes[sha256]
                return False
            self._sizes.move_to_end(sha256)
            self._pins[sha256] = self._pins.get(sha256, 0) + 1
            return True

    def unpin(self, sha256: str) -> None:
        with self._lock:
            left = self._pins.get(sha256, 0) - 1
            if left > 0:
                self._pins[sha256] = left
            else:
                self._pins.pop(sha256, None)
            trash = self._evict()
        self._empty(trash)

    def _evict(self) -> list[Path]:
        """Unpinned folders, oldest first, out of the cache until it fits; call under the lock.
        Each is renamed aside at once (so it is gone for every reader) and deleted later."""
        trash = []
        for sha256 in list(self._sizes):
            if self.total_bytes <= self._max_bytes:
                break
            if sha256 in self._pins:
                continue
            size = self._sizes.pop(sha256)
            aside = self._root / f"{_TRASH_PREFIX}{sha256}-{uuid.uuid4().hex[:8]}"
            try:
                (self._root / sha256).rename(aside)
                trash.append(aside)
            except FileNotFoundError:
                pass
            self._metrics.adapter_cache_evictions.inc()
            log.info("evicted adapter artifact %s (%d bytes) from the disk cache", sha256, size)
        self._metrics.adapter_cache_bytes.set(self.total_bytes)
        return trash

    @staticmethod
    def _empty(trash: list[Path]) -> None:
        for folder in trash:
            shutil.rmtree(folder, ignore_errors=True)
