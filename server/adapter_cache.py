"""Download: adapter artifacts from the registry's artifact store onto local disk.

One folder per sha256 under the cache root, verified on the way in (the artifact store checks
the digest before it unpacks), least recently used folders evicted beyond a byte budget. Folders
of versions loaded into the engine are pinned: vLLM may reload an adapter from its path at any
time, and a missing path inside `generate` would kill the engine (see `server.engine_vllm`).
Blocking: callers run it in a worker thread.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

from registry.artifacts import ArtifactStore
from registry.errors import ArtifactError
from registry.records import VersionRecord
from server.errors import AdapterUnavailableError
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class AdapterDiskCache:
    def __init__(
        self, root: Path, *, artifacts: ArtifactStore, max_bytes: int, metrics: ServerMetrics
    ):
        self._root = root
        self._artifacts = artifacts
        self._max_bytes = max_bytes
        self._metrics = metrics
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # sha256 -> bytes, oldest first
        self._pins: dict[str, int] = {}
        root.mkdir(parents=True, exist_ok=True)
        for folder in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime):
            if folder.is_dir() and not folder.name.startswith("."):
                self._sizes[folder.name] = _folder_bytes(folder)

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def contains(self, sha256: str) -> bool:
        return sha256 in self._sizes

    def get(self, version: VersionRecord) -> Path:
        """The local folder of `version`, downloading it if needed. Raises
        `AdapterUnavailableError` when it is not here and the artifact store cannot provide it."""
        folder = self._root / version.sha256
        with self._lock:
            if version.sha256 in self._sizes and folder.is_dir():
                self._sizes.move_to_end(version.sha256)
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
        with self._lock:
            self._sizes[version.sha256] = _folder_bytes(folder)
            self._sizes.move_to_end(version.sha256)
            self._evict()
        return folder

    def pin(self, sha256: str) -> None:
        with self._lock:
            self._pins[sha256] = self._pins.get(sha256, 0) + 1

    def unpin(self, sha256: str) -> None:
        with self._lock:
            left = self._pins.get(sha256, 0) - 1
            if left > 0:
                self._pins[sha256] = left
            else:
                self._pins.pop(sha256, None)
            self._evict()

    def _evict(self) -> None:
        for sha256 in list(self._sizes):
            if self.total_bytes <= self._max_bytes:
                return
            if sha256 in self._pins:
                continue
            size = self._sizes.pop(sha256)
            shutil.rmtree(self._root / sha256, ignore_errors=True)
            self._metrics.adapter_cache_evictions.inc()
            log.info("evicted adapter artifact %s (%d bytes) from the disk cache", sha256, size)
