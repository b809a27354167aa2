"""The two HTTP systems under test, each started as its own process group and stopped cleanly:
`loraplex serve`, and vLLM's own OpenAI server with the same engine settings.

`EngineSettings` is the single source of the engine configuration; both command lines are built
from it so the comparison cannot drift. Raw vLLM runs with `LORAPLEX_VLLM_PATCHES` removed from
its environment: loraplex's vLLM plugin is installed in the same venv and stays inert there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench._workload import BASE_MODEL
from loraplex.hardware import choose_dtype

READY_TIMEOUT_SECONDS = 300.0
STOP_TIMEOUT_SECONDS = 30.0
PATCH_FLAG = "LORAPLEX_VLLM_PATCHES"


class ServerStartError(Exception):
    """A system under test did not become ready; the message ends with its log tail."""


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Engine configuration shared by loraplex and raw vLLM."""

    model_dir: Path
    adapters: dict[str, Path]
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int = 16  # loraplex's default
    max_num_seqs: int = 32  # loraplex's default
    kv_cache_gib: int = 2
    max_model_len: int = 2048
    # What `loraplex serve` would choose on this machine, unless a benchmark overrides it.
    dtype: str = field(default_factory=lambda: choose_dtype().dtype)
    seed: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. thread settings

    def to_json(self) -> dict[str, object]:
        return {
            "model_dir": str(self.model_dir),
            "adapters": {k: str(v) for k, v in self.adapters.items()},
            "max_loras": self.max_loras,
            "max_lora_rank": self.max_lora_rank,
            "max_cpu_loras": self.max_cpu_loras,
            "max_num_seqs": self.max_num_seqs,
            "kv_cache_gib": self.kv_cache_gib,
            "max_model_len": self.max_model_len,
            "dtype": self.dtype,
            "seed": self.seed,
            "extra_env": dict(self.extra_env),
        }


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_path: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _venv_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _base_env(settings: EngineSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != PATCH_FLAG and not k.startswith("LORAPLEX_")}
    env.update(
        VLLM_TARGET_DEVICE="cpu",
        VLLM_CPU_KVCACHE_SPACE=str(settings.kv_cache_gib),
        VLLM_LOGGING_LEVEL="WARNING",
    )
    env.update(settings.extra_env)
    return env


def loraplex_spec(settings: EngineSettings, *, port: int, home: Path) -> LaunchSpec:
    if settings.seed != 0:
        raise ValueError("loraplex serve always runs with seed 0 (it has no seed setting)")
    command = [_venv_bin("loraplex")]
    env = _base_env(settings)
    if "BENCH_LORA_TARGET_MODULES" in env:
        # A setting without a loraplex flag: an experiment-only launcher applies it.
        command = [sys.executable, str(Path(__file__).with_name("_loraplex_launcher.py"))]
    argv = [
        *command, "serve", "--port", str(port), "--model", str(settings.model_dir),
        "--dtype", settings.dtype,
        "--max-loras", str(settings.max_loras), "--max-lora-rank", str(settings.max_lora_rank),
        "--kv-cache-gib", str(settings.kv_cache_gib),
        "--max-model-len", str(settings.max_model_len),
    ]  # fmt: skip
    for name, path in settings.adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    # Settings that `loraplex serve` has no flag for are read from LORAPLEX_* variables.
    env.update(
        LORAPLEX_HOME=str(home),
        LORAPLEX_MAX_NUM_SEQS=str(settings.max_num_seqs),
        LORAPLEX_MAX_CPU_LORAS=str(settings.max_cpu_loras),
    )
    return LaunchSpec(name="loraplex", argv=argv, env=env, ready_path="/ready")


def vllm_spec(settings: EngineSettings, *, port: int) -> LaunchSpec:
    # The `vllm` console script of vllm-cpu 0.32.0 crashes (its distribution is `vllm-cpu`).
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--host", "127.0.0.1", "--port", str(port),
        "--model", str(settings.model_dir), "--served-model-name", BASE_MODEL,
        "--dtype", settings.dtype, "--seed", str(settings.seed),
        "--max-model-len", str(settings.max_model_len),
        "--max-num-seqs", str(settings.max_num_seqs),
        "--generation-config", "vllm",
        "--enable-lora", "--max-loras", str(settings.max_loras),
        "--max-lora-rank", str(settings.max_lora_rank),
        "--max-cpu-loras", str(settings.max_cpu_loras),
        "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    if settings.adapters:
        argv += ["--lora-modules", *(f"{n}={p}" for n, p in settings.adapters.items())]
    return LaunchSpec(name="vllm", argv=argv, env=_base_env(settings), ready_path="/health")


@dataclass(frozen=True, slots=True)
class RunningServer:
    base_url: str
    pid: int


@contextlib.contextmanager
def running(spec: LaunchSpec, *, port: int, log_path: Path) -> Iterator[RunningServer]:
    """Start the server in its own process group, wait until ready, yield it, stop it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            spec.argv, env=spec.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_ready(proc, base_url + spec.ready_path, log_path=log_path, name=spec.name)
            yield RunningServer(base_url=base_url, pid=proc.pid)
        finally:
            _stop(proc)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, *, log_path: Path, name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"{name} exited with {proc.returncode}:\n{_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise ServerStartError(
        f"{name} not ready after {READY_TIMEOUT_SECONDS:.0f} s:\n{_tail(log_path)}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    pgid = os.getpgid(proc.pid)
    os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        proc.wait()
    # The engine core and workers are in the same group and shut down after the server; give
    # them a moment, then make sure none outlives the measurement.
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.2)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
