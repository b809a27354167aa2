"""Running one system under test through a list of scenarios, each measurement guarded against
other work on the machine: wait for quiet, measure, and measure again when other processes took
too much CPU meanwhile (the figure is then kept, flagged, if it never came out clean).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bench._load import measure_scenario
from bench._machine import ForeignCpu, LoadSample, TreeCpu, process_layout, wait_for_quiet
from bench._peft_loop import PeftLoop, probe_dtypes
from bench._servers import EngineSettings, LaunchSpec, free_port, running
from bench._workload import ScenarioResult, warmup_items, work_items
from loraplex.hardware import choose_dtype

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RunOptions:
    requests: int
    concurrency: int
    max_tokens: int
    scenarios: tuple[str, ...]
    work_dir: Path
    busy_threshold_cores: float = 0.3  # other processes' CPU use that spoils a measurement
    max_wait_seconds: float = 600.0
    attempts: int = 3

    def __post_init__(self) -> None:
        positive = {
            "requests": self.requests, "concurrency": self.concurrency,
            "max_tokens": self.max_tokens, "attempts": self.attempts,
        }  # fmt: skip
        problems = [f"{k} must be at least 1, got {v}" for k, v in positive.items() if v < 1]
        if not self.scenarios:
            problems.append("no scenarios to run")
        if problems:
            raise ValueError("; ".join(problems))


def _log(message: str) -> None:
    print(message, flush=True)


def on_quiet_machine(measure: Callable[[], T], opts: RunOptions) -> tuple[T, LoadSample, int]:
    """Run `measure` once the machine is quiet; again while other processes disturb it.

    Returns the last result, the load during it, and the attempt number; a result that never
    came out clean is returned all the same (its load says so).
    """
    for attempt in range(1, opts.attempts + 1):
        wait_for_quiet(
            threshold_cores=opts.busy_threshold_cores,
            max_wait_seconds=opts.max_wait_seconds,
            log=_log,
        )
        meter = ForeignCpu()
        meter.start()
        result = measure()
        load = meter.stop()
        if load.foreign_cpu_cores < opts.busy_threshold_cores or attempt == opts.attempts:
            return result, load, attempt
        _log(f"  disturbed: other processes used {load.foreign_cpu_cores} cores; measuring again")
    raise AssertionError("unreachable: RunOptions guarantees attempts >= 1")


def guarded(
    measure: Callable[[], ScenarioResult], opts: RunOptions, *, tree: TreeCpu | None = None
) -> dict[str, object]:
    """A scenario measured on a quiet machine, with the load it ran under.

    With `tree`, also the CPU seconds each process role of the server used meanwhile.
    """

    def observed() -> tuple[ScenarioResult, dict[str, float] | None]:
        if tree is not None:
            tree.start()
        result = measure()
        return result, (tree.stop() if tree is not None else None)

    (result, server_cpu), load, attempt = on_quiet_machine(observed, opts)
    figures: dict[str, object] = {**result.to_json(), **_load_json(load), "attempt": attempt}
    figures["disturbed"] = load.foreign_cpu_cores >= opts.busy_threshold_cores
    if server_cpu is not None:
        figures["server_cpu_seconds"] = server_cpu
    return figures


def _load_json(load: LoadSample) -> dict[str, float]:
    return {
        "load_avg_1m_before": load.load_avg_1m,
        "foreign_cpu_cores": load.foreign_cpu_cores,
        "steal_cpu_cores": load.steal_cpu_cores,
    }


def run_http_system(
    make_spec: Callable[[int], LaunchSpec], opts: RunOptions, *, label: str,
    measure_with: Callable[..., ScenarioResult] = measure_scenario,
    on_ready: Callable[[str], None] | None = None,
) -> tuple[dict[str, dict[str, object]], list[dict[str, object]]]:  # fmt: skip
    """Start a server, measure every scenario against it (through loadtest), stop it.

    `measure_with` has `bench._load.measure_scenario`'s signature (a server that needs more in
    each request body brings its own); `on_ready(base_url)` runs once before the scenarios.
    Returns the figures per scenario and the server's process layout (threads, CPU binding).
    loadtest's summary and per-request CSV of each scenario are kept under
    `work_dir/loadtest/<label>/<scenario>/`.
    """
    port = free_port()
    spec = make_spec(port)
    results: dict[str, dict[str, object]] = {}
    log_path = opts.work_dir / "logs" / f"{label}.log"
    _log(f"{label}: starting ({spec.name}, log {log_path})")
    with running(spec, port=port, log_path=log_path) as server:
        layout = process_layout(server.pid)
        if on_ready is not None:
            on_ready(server.base_url)
        for scenario in opts.scenarios:
            measure = functools.partial(
                measure_with, server.base_url,
                items=work_items(scenario, requests=opts.requests),
                warmup=warmup_items(scenario), concurrency=opts.concurrency,
                max_tokens=opts.max_tokens, folder=opts.work_dir / "loadtest" / label / scenario,
            )  # fmt: skip
            results[scenario] = guarded(measure, opts, tree=TreeCpu(server.pid))
            _log(f"  {label} {scenario}: {_brief(results[scenario])}")
    return results, layout


def run_peft(
    settings: EngineSettings, opts: RunOptions, *, dtype: str
) -> tuple[dict[str, dict[str, object]], dict[str, object]]:
    """Measure the peft loop in `dtype`: 'auto' is what this CPU runs fast
    (`loraplex.hardware.choose_dtype`), 'probe' times fp32 and bf16 first and keeps the faster."""
    info: dict[str, object] = {"torch_threads": 2}
    if dtype == "auto":
        choice = choose_dtype(cuda=False)  # the loop runs on the CPU
        dtype, info["dtype_reason"] = choice.dtype, choice.reason
    elif dtype == "probe":
        probe = functools.partial(
            probe_dtypes, settings.model_dir, settings.adapters,
            items=work_items("mixed", requests=4), max_tokens=32,
        )  # fmt: skip
        probes, load, _ = on_quiet_machine(probe, opts)
        info["dtype_probe_output_tokens_per_second"] = {
            p.dtype: p.output_tokens_per_second for p in probes
        }
        info["dtype_probe_load"] = _load_json(load)
        dtype = max(probes, key=lambda p: p.output_tokens_per_second).dtype
        _log(f"peft: dtype probe {info['dtype_probe_output_tokens_per_second']} -> {dtype}")
    info["dtype"] = dtype
    loop = PeftLoop(settings.model_dir, settings.adapters, dtype=dtype)
    results: dict[str, dict[str, object]] = {}
    for scenario in opts.scenarios:
        measure = functools.partial(
            loop.measure_scenario, scenario=scenario,
            items=work_items(scenario, requests=opts.requests),
            warmup=warmup_items(scenario), max_tokens=opts.max_tokens,
        )  # fmt: skip
        results[scenario] = guarded(measure, opts)
        _log(f"  peft {scenario}: {_brief(results[scenario])}")
    return results, info


def _brief(figures: dict[str, object]) -> str:
    return (
        f"{figures['output_tokens_per_second']} tok/s, TTFT p50 {figures['ttft_median_ms']} ms, "
        f"e2e p50 {figures['e2e_median_ms']} ms, other CPU {figures['foreign_cpu_cores']}"
    )
