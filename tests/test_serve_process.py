"""`loraplex serve` as a process a user or a supervisor runs: a quiet console, Ctrl-C that stops
it within seconds and leaks nothing, and a non-zero exit when its engine dies. Each test starts
one real engine (~30-45 s on 2 cores); the same contracts on the fake engine, fast, are in
tests/test_engine_lifecycle.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.servers import free_port, wait_for
from tests.test_cli import LORAPLEX

pytestmark = pytest.mark.engine

NOISE = ("Triton", "FutureWarning", "leaked", "resource_tracker", "Traceback", "Exception ignored")


class ServeProcess:
    """One `loraplex serve` in its own process group (as a shell runs it), output in files."""

    def __init__(self, process: subprocess.Popen, url: str, output: Path):
        self.process, self.url, self.output = process, url, output

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_ready(self, timeout: float = 600) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"loraplex serve exited early:\n{self.text()}")
            try:
                return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=timeout, every=0.5)

    def exit_seconds(self, timeout: float = 60) -> float:
        started = time.monotonic()
        self.process.wait(timeout=timeout)
        return time.monotonic() - started


@contextmanager
def serve(tmp_path: Path, model_dir: Path, *flags: str) -> Iterator[ServeProcess]:
    port = free_port()
    output = tmp_path / "serve.log"
    env = {**os.environ, "LORAPLEX_HOME": str(tmp_path / "home"), "LORAPLEX_KV_CACHE_GIB": "1"}
    for inherited in ("VLLM_LOGGING_LEVEL", "PYTHONWARNINGS", "TORCH_CPP_LOG_LEVEL"):
        env.pop(inherited, None)  # the console a user gets, not the one this suite may set
    cmd = [LORAPLEX, "serve", "--model", str(model_dir), "--port", str(port), "--max-model-len", "512", *flags]  # fmt: skip
    with output.open("w") as sink:
        process = subprocess.Popen(
            cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield ServeProcess(process, f"http://127.0.0.1:{port}", output)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


def _long_stream(url: str, lines: list[str], first: threading.Event) -> None:
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            lines.append(line)
            first.set()


def test_ctrl_c_drains_stops_within_seconds_quietly_and_leaks_nothing(tmp_path, embedded_model_dir):
    with serve(tmp_path, embedded_model_dir, "--drain-seconds", "1") as server:
        server.wait_ready()
        children = psutil.Process(server.process.pid).children(recursive=True)
        assert any("EngineCore" in c.name() for c in children), children
        lines: list[str] = []
        first = threading.Event()
        stream = threading.Thread(target=_long_stream, args=(server.url, lines, first))
        stream.start()
        assert first.wait(timeout=120)  # a request in flight: 400 tokens take far longer than 1 s
        os.killpg(server.process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        seconds = server.exit_seconds()
        print(f"loraplex serve stopped {seconds:.2f} s after SIGINT, a stream in flight")
        stream.join(timeout=10)
        output = server.text()
        assert server.process.returncode == 0, output
        assert seconds < 15, f"took {seconds:.1f} s to stop"
        # The stream had its drain second, then an OpenAI-shaped error event, then [DONE].
        events = [line for line in lines if line]
        assert "shutting down" in events[-2] and events[-1] == "data: [DONE]", events[-3:]
        assert "loraplex is serving" in output
        assert not [word for word in NOISE if word in output], output
        wait_for(lambda: not _alive(children), timeout=5)  # no engine process outlives it


def test_a_killed_engine_core_makes_serve_exit_non_zero(tmp_path, embedded_model_dir):
    with serve(tmp_path, embedded_model_dir) as server:
        server.wait_ready()
        children = psutil.Process(server.process.pid).children(recursive=True)
        cores = [c for c in children if "EngineCore" in c.name()]
        assert len(cores) == 1, [c.name() for c in children]
        cores[0].send_signal(signal.SIGKILL)
        seconds = server.exit_seconds(timeout=30)
        print(f"loraplex serve exited {seconds:.2f} s after its engine core was killed")
        output = server.text()
        assert server.process.returncode == 1, output
        assert seconds < 10
        error_lines = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1, output
        assert "EngineCore was killed by SIGKILL" in error_lines[0]
        wait_for(lambda: not _alive(children), timeout=10)  # the orphaned worker exits too
