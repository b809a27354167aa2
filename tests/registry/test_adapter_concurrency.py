"""The adapter cache and loader under concurrency, with eviction really happening: a disk cache
smaller than the versions it serves, fewer engine slots than versions, many cold loads at once,
and streams abandoned before and after their first token. Real SQLite and file artifact store;
the fake engine counts its slots and checks every adapter folder as vLLM would read it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import ClientDisconnect

from registry.service import Registry
from registry.settings import RegistrySettings
from server.adapter_cache import AdapterDiskCache
from server.app import create_app
from tests.support.registry_stack import RegistryStack, SlotEngine
from tests.support.servers import wait_for

CHAT = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}


@pytest.fixture
def sqlite_registry(tmp_path: Path) -> Iterator[Registry]:
    settings = RegistrySettings(
        home=tmp_path / "home",
        registry=f"sqlite:///{tmp_path / 'registry.db'}",
        artifacts=(tmp_path / "artifacts").as_uri(),
    )
    with Registry.open(settings) as registry:
        yield registry


def register(registry: Registry, make_adapter: Callable[..., Path], name: str, count: int):
    return [registry.register(name, make_adapter(), actor="t") for _ in range(count)]


def folder_bytes(registry: Registry, version, tmp_path: Path) -> int:
    folder = registry.fetch(version, tmp_path / "probe" / version.sha256)
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


async def use(stack: RegistryStack, model: str, *, hold: float = 0.01) -> str:
    """Resolve `model` as a request would, check its folder is on disk, hold it, release it."""
    target = await stack.resolver.resolve(model)
    try:
        if not Path(target.adapter.path).is_dir():
            raise AssertionError(f"{model}: leased a version whose folder is gone")
        await asyncio.sleep(hold)
        return target.served_as
    finally:
        target.done()


def test_concurrent_cold_loads_stay_within_the_slots_and_the_cache(
    tmp_path, sqlite_registry, make_adapter
):
    versions = register(sqlite_registry, make_adapter, "many", 12)
    budget = 2 * folder_bytes(sqlite_registry, versions[0], tmp_path)
    engine = SlotEngine(slots=3, load_delay=0.01)
    stack = RegistryStack(
        tmp_path, sqlite_registry, engine=engine, max_loaded=3, cache_bytes=budget
    )
    models = [f"many@{1 + i % 12}" for i in range(36)]

    async def run():
        await stack.resolver.refresh()
        return await asyncio.gather(*(use(stack, m) for m in models), return_exceptions=True)

    results = asyncio.run(run())
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert results == models
    assert engine.problems == []
    assert engine.peak <= 3
    assert stack.sample("loraplex_adapter_cache_evictions_total") > 0  # it really evicted
    assert stack.leases() == 0
    # On disk: the versions loaded now (pinned) plus whatever fits the budget.
    loaded = {v.sha256 for v in versions if v.ref in engine.loaded_keys()}
    assert loaded <= stack.cached_folders()
    assert stack.cache.total_bytes <= budget + len(loaded) * budget // 2


def test_a_fresh_download_is_pinned_before_anything_can_evict_it(
    tmp_path, sqlite_registry, make_adapter
):
    versions = register(sqlite_registry, make_adapter, "tiny", 3)
    engine = SlotEngine(slots=2)
    # A cache smaller than one adapter: only pins keep folders on disk.
    stack = RegistryStack(tmp_path, sqlite_registry, engine=engine, max_loaded=2, cache_bytes=1)

    async def run():
        await stack.resolver.refresh()
        return [await use(stack, v.ref) for v in versions]

    assert asyncio.run(run()) == [v.ref for v in versions]
    assert engine.problems == []
    assert engine.loaded_keys() == {"tiny@2", "tiny@3"}
    assert stack.cached_folders() == {versions[1].sha256, versions[2].sha256}  # 1 evicted


def test_local_adapter_folders_take_engine_slots_too(tmp_path, sqlite_registry, make_adapter):
    versions = register(sqlite_registry, make_adapter, "reg", 3)
    local = {"local-a": make_adapter(), "local-b": make_adapter()}
    engine = SlotEngine(slots=3)
    stack = RegistryStack(tmp_path, sqlite_registry, engine=engine, max_loaded=3, local=local)

    async def run():
        await stack.resolver.preload()
        try:
            return [await use(stack, v.ref) for v in versions]
        finally:
            await stack.resolver.close()

    assert asyncio.run(run()) == ["reg@1", "reg@2", "reg@3"]
    assert engine.problems == [] and engine.peak == 3
    assert engine.loaded_keys() == {"local-a", "local-b", "reg@3"}


def test_the_loader_follows_what_the_engine_really_holds(tmp_path, sqlite_registry, make_adapter):
    register(sqlite_registry, make_adapter, "drift", 3)
    engine = SlotEngine(slots=2)
    stack = RegistryStack(tmp_path, sqlite_registry, engine=engine, max_loaded=2)

    async def run():
        await stack.resolver.refresh()
        await use(stack, "drift@1")
        await use(stack, "drift@2")
        dropped = next(a for a in engine._adapters.values() if a.key == "drift@2")
        engine.drop(dropped.engine_id)  # the engine let drift@2 go on its own
        await use(stack, "drift@3")  # room for it without unloading drift@1
        after_drift3 = engine.loaded_keys()
        await use(stack, "drift@2")  # loaded again, not assumed present
        return after_drift3

    assert asyncio.run(run()) == {"drift@1", "drift@3"}
    assert stack.loads("drift@2") == 2
    assert engine.loaded_keys() == {"drift@3", "drift@2"}
    assert engine.problems == []


def test_concurrent_first_requests_download_and_load_once(tmp_path, sqlite_registry, make_adapter):
    register(sqlite_registry, make_adapter, "once", 1)
    engine = SlotEngine(slots=2, load_delay=0.05)
    stack = RegistryStack(tmp_path, sqlite_registry, engine=engine, max_loaded=2)

    async def run():
        await stack.resolver.refresh()
        return await asyncio.gather(*(use(stack, "once@1", hold=0.05) for _ in range(20)))

    assert asyncio.run(run()) == ["once@1"] * 20
    miss = {"adapter": "once@1", "result": "miss"}
    assert stack.sample("loraplex_adapter_cache_lookups_total", miss) == 1
    assert stack.loads("once@1") == 1
    assert stack.leases() == 0


def test_the_disk_cache_pins_what_it_hands_out(tmp_path, sqlite_registry, make_adapter):
    versions = register(sqlite_registry, make_adapter, "pins", 3)
    stack = RegistryStack(tmp_path, sqlite_registry, cache_bytes=1)
    cache: AdapterDiskCache = stack.cache
    folders = [cache.acquire(v) for v in versions]  # each pinned from the moment it is on disk
    assert all(f.is_dir() for f in folders)
    cache.unpin(versions[0].sha256)
    assert not folders[0].exists() and folders[1].is_dir() and folders[2].is_dir()
    cache.unpin(versions[1].sha256)
    cache.unpin(versions[2].sha256)
    assert stack.cached_folders() == set()


# -- streams abandoned by their clients, over real HTTP -----------------------------------------


def serve_two_versions(tmp_path, registry, make_adapter, *, token_delay: float) -> RegistryStack:
    register(registry, make_adapter, "s", 2)
    registry.store.promote("s", 1, actor="t")
    engine = SlotEngine(slots=1, token_delay=token_delay)
    return RegistryStack(tmp_path, registry, engine=engine, max_loaded=1).serve()


def test_a_stream_abandoned_before_its_first_token_releases_its_lease(
    tmp_path, sqlite_registry, make_adapter, stacks
):
    stack = serve_two_versions(tmp_path, sqlite_registry, make_adapter, token_delay=0.4)
    stacks.append(stack)
    for _ in range(3):  # the client gives up before the first token (and the headers) arrive
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{stack.url}/v1/chat/completions",
                json={"model": "s", **CHAT},
                timeout=httpx.Timeout(5.0, read=0.1),
            )
    wait_for(lambda: stack.in_flight() == 0 and stack.leases() == 0, timeout=10)
    # Nothing holds s@1 any more, so the only slot can go to s@2.
    assert stack.served("s@2") == "s@2"
    assert stack.engine.problems == []
    aborted = {"model": "s@1", "endpoint": "chat", "status": "499"}
    assert stack.sample("loraplex_requests_total", aborted) == 3


def test_a_stream_abandoned_after_its_first_token_releases_its_lease(
    tmp_path, sqlite_registry, make_adapter, stacks
):
    stack = serve_two_versions(tmp_path, sqlite_registry, make_adapter, token_delay=0.2)
    stacks.append(stack)
    with httpx.Client(timeout=10) as client:
        for _ in range(3):
            body = {"model": "s", **CHAT}
            with client.stream("POST", f"{stack.url}/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                first = next(r.iter_lines())
                assert first.startswith("data: ")
            # leaving the block closes the connection mid-stream
    wait_for(lambda: stack.in_flight() == 0 and stack.leases() == 0, timeout=10)
    assert stack.served("s@2") == "s@2"
    assert stack.engine.problems == []


def test_many_streams_some_abandoned_leave_nothing_held(
    tmp_path, sqlite_registry, make_adapter, stacks
):
    stack = serve_two_versions(tmp_path, sqlite_registry, make_adapter, token_delay=0.05)
    stacks.append(stack)

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {"model": "s", **CHAT}
        if i % 3 == 0:  # gives up before the first token
            try:
                await client.post("/v1/chat/completions", json=body, timeout=0.02)
            except httpx.TimeoutException:
                return "abandoned early"
            return "finished"
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if i % 3 == 1 and line.startswith("data: "):
                    return "abandoned late"
        return "finished"

    async def run():
        async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
            return await asyncio.gather(*(one(client, i) for i in range(24)))

    outcomes = asyncio.run(run())
    assert {"abandoned early", "abandoned late", "finished"} <= set(outcomes)
    wait_for(lambda: stack.in_flight() == 0 and stack.leases() == 0, timeout=15)
    assert stack.served("s@2") == "s@2"


def test_a_stream_whose_response_never_starts_releases_its_lease(
    tmp_path, sqlite_registry, make_adapter
):
    """ASGI 2.4 servers raise OSError from `send` once the client has gone (the ASGI spec asks
    them to); Starlette then never iterates the body, so only a response-level finaliser can
    return the lease. Driven here as such a server drives the app."""
    register(sqlite_registry, make_adapter, "s", 1)
    sqlite_registry.store.promote("s", 1, actor="t")
    stack = RegistryStack(tmp_path, sqlite_registry, engine=SlotEngine(slots=1))
    app = create_app(engine=stack.engine, resolver=stack.resolver, metrics=stack.metrics)
    body = json.dumps({"model": "s", **CHAT}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }

    async def gone_client() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            raise OSError("the client closed the connection")

        with contextlib.suppress(OSError, ClientDisconnect):
            await app({**scope, "state": {}}, receive, send)

    async def run():
        await stack.engine.start()
        await stack.resolver.refresh()
        for _ in range(3):
            await gone_client()
        await asyncio.sleep(0.1)  # anything left to finish

    asyncio.run(run())
    assert (stack.in_flight(), stack.leases()) == (0, 0)
