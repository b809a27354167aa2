"""Real HTTP servers for tests: a uvicorn server in a thread, on a free loopback port.

The real-engine server is built once per session (engine start is the suite's largest fixed
cost); `call` runs a coroutine on the server's own event loop, where the engine lives.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], *, timeout: float = 30.0, every: float = 0.1) -> float:
    """Poll `predicate` until it holds; return the seconds it took, fail the test after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(every)
    return time.monotonic() - started


class ServerThread:
    def __init__(self, app: FastAPI):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._server.serve())
        except BaseException as e:  # surfaced by start()
            self._error = e

    def start(self, *, timeout: float = 600) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server thread exited during startup: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on {self.url} did not start in {timeout} s")
            time.sleep(0.1)
        return self

    def wait_ready(self, *, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (response := httpx.get(f"{self.url}/ready")).status_code != 200:
            reason = response.json().get("reason", "")
            if reason.startswith("startup failed"):
                raise RuntimeError(f"server on {self.url}: {reason}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url}/ready stayed 503: {reason}")
            time.sleep(0.2)

    def call(self, coro: Coroutine[Any, Any, Any], *, timeout: float = 120) -> Any:
        """Run `coro` on the server's event loop (where the engine lives) and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)
