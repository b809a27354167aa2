"""`loraplex serve` in a child process, spoken to over HTTP only: how the trainer puts an adapter
on the real engine (the serving gate) and how `loraplex eval` reaches registry versions through
the same path users get, without importing the server's code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

_READY_TIMEOUT_SECONDS = 600.0


class ServeError(Exception):
    """The child server would not start, or refused a request; the message says why."""


@contextlib.contextmanager
def serve_child(
    model_dir: Path,
    *,
    args: Sequence[str],
    dtype: str,
    max_lora_rank: int,
    max_loras: int = 1,
    max_model_len: int = 1024,
    max_num_seqs: int = 4,
) -> Iterator[str]:
    """Run `loraplex serve --model model_dir ARGS...` in a temporary home; yield its base URL
    once /ready answers 200; stop it (SIGINT to its process group, then SIGKILL) on exit."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="loraplex-child-") as home:
        command = [
            sys.executable, "-m", "loraplex.cli", "serve", "--model", str(model_dir),
            *args, "--port", str(port), "--max-loras", str(max_loras),
            "--max-lora-rank", str(max_lora_rank), "--kv-cache-gib", "1",
            "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
            "--dtype", dtype, "--home", home,
        ]  # fmt: skip
        log = Path(home) / "serve.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "LORAPLEX_HOME": home},
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, process, log)
            yield url
        finally:
            _stop(process)


def chat_completion(
    url: str, model: str, messages: Sequence[dict[str, str]], *, max_tokens: int
) -> dict[str, Any]:
    """One greedy chat completion: {"content", "finish_reason", "model" (what served it)}."""
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": model,
            "messages": list(messages),
            "temperature": 0,
            "max_tokens": max_tokens,
        },  # fmt: skip
        timeout=300,
    )
    if reply.status_code != 200:
        raise ServeError(f"{model}: HTTP {reply.status_code}: {reply.text[:300]}")
    data = reply.json()
    choice = data["choices"][0]
    return {
        "content": choice["message"]["content"] or "",
        "finish_reason": choice["finish_reason"],
        "model": data.get("model", model),
    }


def _wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise ServeError(f"`loraplex serve` exited with {process.returncode}: {tail.strip()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise ServeError(f"`loraplex serve` was not ready within {_READY_TIMEOUT_SECONDS:.0f} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
