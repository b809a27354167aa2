"""A registry-backed server stack on the fake engine, for tests of routing, the adapter cache and
the loader: real registry database and artifact store, real disk cache, real HTTP when served.

`SlotEngine` is the fake engine with the two properties of vLLM that these tests check against:
a fixed number of adapter slots, and adapters read from their folder (a folder missing when an
adapter is added or used is what kills vLLM, FACTS defect 2).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
from prometheus_client import CollectorRegistry

from registry.artifacts import ArtifactStore
from registry.service import Registry
from server.adapter_cache import AdapterDiskCache
from server.adapter_loader import AdapterLoader
from server.app import create_app
from server.engine import AdapterHandle, GenerationRequest
from server.engine_fake import FakeEngine
from server.errors import AdapterLoadError, EngineError
from server.metrics import ServerMetrics
from server.registry_resolver import RegistryResolver
from server.targets import LocalAdapters
from tests.support.servers import ServerThread


class SlotEngine(FakeEngine):
    """FakeEngine that records how many adapters it held at once and checks every folder."""

    def __init__(self, *, slots: int, load_delay: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.slots = slots
        self.load_delay = load_delay
        self.peak = 0
        self.problems: list[str] = []  # what vLLM would have choked on

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        await asyncio.sleep(self.load_delay)  # vLLM's add_lora yields to the event loop
        if not Path(adapter.path).is_dir():
            self.problems.append(f"{adapter.key}: folder {adapter.path} missing when added")
            raise AdapterLoadError(f"no folder for {adapter.key}", adapter=adapter.key)
        await super().add_adapter(adapter)
        self.peak = max(self.peak, len(self._adapters))
        if len(self._adapters) > self.slots:
            self.problems.append(f"{len(self._adapters)} adapters in {self.slots} slots")

    async def generate(self, request: GenerationRequest):
        adapter = request.adapter
        if adapter is not None and not Path(adapter.path).is_dir():
            self.problems.append(f"{adapter.key}: folder {adapter.path} missing in generate")
            raise EngineError(f"folder of {adapter.key} vanished")
        async for delta in super().generate(request):
            yield delta

    def drop(self, engine_id: int) -> None:
        """Forget an adapter behind the loader's back, as vLLM's own LRU cache may."""
        self._adapters.pop(engine_id, None)

    def loaded_keys(self) -> set[str]:
        return {a.key for a in self._adapters.values()}


class RegistryStack:
    """Resolver, loader, disk cache and (once `serve`d) an HTTP server around one engine."""

    def __init__(
        self,
        tmp_path: Path,
        registry: Registry,
        *,
        artifacts: ArtifactStore | None = None,
        engine: FakeEngine | None = None,
        max_loaded: int = 8,
        max_rank: int = 16,
        cache_bytes: int = 10**9,
        local: dict[str, Path] | None = None,
        poll_seconds: float = 0.1,
        ab: dict | None = None,
    ) -> None:
        """`ab`: options of the A/B runtime (flush_seconds, analysis_seconds, ...)."""
        self.registry = registry
        self.engine = engine or SlotEngine(slots=max_loaded)
        self.metrics = ServerMetrics(CollectorRegistry())
        self.cache_root = tmp_path / "cache"
        self.cache = AdapterDiskCache(
            self.cache_root,
            artifacts=artifacts or registry.artifacts,
            max_bytes=cache_bytes,
            metrics=self.metrics,
        )
        self.local = LocalAdapters(
            self.engine, base_name="fake", adapters=local or {}, metrics=self.metrics
        )
        self.loader = AdapterLoader(
            self.engine,
            self.cache,
            metrics=self.metrics,
            max_loaded=max_loaded,
            max_rank=max_rank,
            first_id=len(local or {}) + 1,
        )
        self.resolver = RegistryResolver(
            registry.store,
            self.loader,
            local=self.local,
            metrics=self.metrics,
            poll_seconds=poll_seconds,
            max_loras=self.engine.info.max_loras,
            **{"flush_seconds": 0.2, "analysis_seconds": 0.5, **(ab or {})},
        )
        self.server: ServerThread | None = None
        self.client: openai.OpenAI | None = None

    # -- over HTTP ----------------------------------------------------------------------------

    def serve(self, *, admin_key: str | None = None) -> RegistryStack:
        app = create_app(
            engine=self.engine, resolver=self.resolver, metrics=self.metrics,
            registry=self.registry, admin_key=admin_key,
        )  # fmt: skip
        self.server = ServerThread(app).start()
        self.server.wait_ready()
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None, "serve() first"
        return self.server.url

    def served(self, model: str) -> str:
        """The `model` a one-token chat completion for `model` answers with."""
        assert self.client is not None, "serve() first"
        reply = self.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        return reply.model

    def ready(self) -> dict:
        return httpx.get(f"{self.url}/ready").json()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    # -- state, for assertions ----------------------------------------------------------------

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def leases(self) -> int:
        return int(self.sample("loraplex_adapter_leases"))

    def in_flight(self) -> int:
        return int(self.sample("loraplex_requests_in_flight"))

    def loads(self, ref: str) -> int:
        return int(self.sample("loraplex_adapter_loads_total", {"adapter": ref, "status": "ok"}))

    def warmup_failures(self, ref: str) -> int:
        return int(self.sample("loraplex_adapter_warmup_failures_total", {"adapter": ref}))

    def cached_folders(self) -> set[str]:
        if not self.cache_root.is_dir():
            return set()
        return {p.name for p in self.cache_root.iterdir() if not p.name.startswith(".")}
