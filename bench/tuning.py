"""Tuning experiments: what moves loraplex's throughput with adapters mixed on this CPU.

Each experiment starts `loraplex serve` with one change from the defaults (max_num_seqs, KV-cache
size, vLLM's CPU thread binding, OpenMP threads, dtype, LoRA ops, LoRA target modules, or the
client's concurrency), runs scenarios of bench/serving.py ("mixed" unless --scenarios), and stops
the server. It records output tokens/s, TTFT,
the CPU seconds each server process used, and the processes' thread/CPU binding, and compares
each experiment with the baseline and, given a serving result (--peft-json), with the peft loop.

    .venv/bin/python bench/tuning.py --requests 24 --peft-json bench/results/serving-....json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import machine_info
from bench._report import write_json
from bench._servers import EngineSettings, loraplex_spec
from bench._systems import RunOptions, run_http_system
from bench._workload import SCENARIOS
from bench.serving import (
    RESULTS_DIR,
    add_dtype_option,
    default_home,
    engine_settings,
    resolve_model,
    utc_stamp,
)


@dataclass(frozen=True, slots=True)
class Experiment:
    description: str
    max_num_seqs: int | None = None
    kv_cache_gib: int | None = None
    dtype: str | None = None
    concurrency: int | None = None
    env: dict[str, str] = field(default_factory=dict)


RESERVE_ONE = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
ATTN_ONLY = {"BENCH_LORA_TARGET_MODULES": "qkv_proj,o_proj"}
EXPERIMENTS: dict[str, Experiment] = {
    "baseline": Experiment(
        "loraplex defaults: max_num_seqs 32, KV 2 GiB, the dtype chosen for this CPU (or --dtype),"
        " auto CPU binding, no core reserved on <= 2 CPUs, fused LoRA ops"
    ),
    "seqs8": Experiment("max_num_seqs 8", max_num_seqs=8),
    "seqs16": Experiment("max_num_seqs 16", max_num_seqs=16),
    "kv1": Experiment("KV cache 1 GiB", kv_cache_gib=1),
    "kv4": Experiment("KV cache 4 GiB", kv_cache_gib=4),
    "reserve1": Experiment(
        "VLLM_CPU_NUM_OF_RESERVED_CPU=1 (vLLM's default: a core kept for its scheduler)",
        env=RESERVE_ONE,
    ),
    "bind01": Experiment("VLLM_CPU_OMP_THREADS_BIND=0-1", env={"VLLM_CPU_OMP_THREADS_BIND": "0-1"}),
    "bind1": Experiment("VLLM_CPU_OMP_THREADS_BIND=1", env={"VLLM_CPU_OMP_THREADS_BIND": "1"}),
    "nobind": Experiment(
        "VLLM_CPU_OMP_THREADS_BIND=nobind (OpenMP default: 2 threads, unpinned)",
        env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"},
    ),
    "nobind_omp1": Experiment(
        "VLLM_CPU_OMP_THREADS_BIND=nobind, OMP_NUM_THREADS=1 (1 thread, unpinned)",
        env={"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"},
    ),
    "fp32": Experiment("dtype float32 (--dtype float32)", dtype="float32"),
    "bf16": Experiment("dtype bfloat16 (--dtype bfloat16)", dtype="bfloat16"),
    "vllm_ops": Experiment(
        "vLLM's own CPU LoRA ops (--lora-ops vllm)", env={"LORAPLEX_LORA_OPS": "vllm"}
    ),  # fmt: skip
    "attn_only": Experiment(
        "vLLM lora_target_modules=qkv_proj,o_proj (no loraplex flag: experiment launcher)",
        env=ATTN_ONLY,
    ),
    "conc16": Experiment("client concurrency 16 (not the fixed workload)", concurrency=16),
    "conc32": Experiment("client concurrency 32 (not the fixed workload)", concurrency=32),
}
DEFAULT_SELECTION = (
    "baseline", "seqs8", "seqs16", "kv1", "kv4", "reserve1", "bind01", "bind1", "nobind",
    "nobind_omp1", "fp32", "vllm_ops", "attn_only", "conc16", "conc32",
)  # fmt: skip


def _experiment_env(text: str) -> tuple[str, Experiment]:
    """NAME=K1=V1;K2=V2 -> an ad-hoc experiment with those environment variables."""
    name, _, pairs = text.partition("=")
    env = dict(p.split("=", 1) for p in pairs.split(";") if "=" in p)
    if not name or not env:
        raise argparse.ArgumentTypeError(f"expected NAME=KEY=VALUE[;KEY=VALUE], got {text!r}")
    return name, Experiment(f"env {env}", env=env)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--scenarios", default="mixed", help=f"comma-separated, from: {','.join(SCENARIOS)}"
    )
    p.add_argument(
        "--experiments", default=",".join(DEFAULT_SELECTION),
        help=f"comma-separated, from: {','.join(EXPERIMENTS)}",
    )  # fmt: skip
    p.add_argument(
        "--custom", type=_experiment_env, action="append", default=[],
        help="an extra experiment: NAME=KEY=VALUE[;KEY=VALUE] (environment of the server)",
    )  # fmt: skip
    p.add_argument("--repeat", type=int, default=1, help="run each experiment this many times")
    p.add_argument("--peft-json", type=Path, default=None, help="serving result with peft mixed")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--home", type=Path, default=None)
    p.add_argument("--work-dir", type=Path, default=Path("~/.cache/loraplex-bench"))
    p.add_argument("--busy-threshold", type=float, default=0.3)
    add_dtype_option(p, what="baseline engine")
    return p


def _settings_for(base: EngineSettings, exp: Experiment) -> EngineSettings:
    return replace(
        base,
        max_num_seqs=exp.max_num_seqs or base.max_num_seqs,
        kv_cache_gib=exp.kv_cache_gib or base.kv_cache_gib,
        dtype=exp.dtype or base.dtype,
        extra_env={**base.extra_env, **exp.env},
    )


def run_experiment(
    name: str, exp: Experiment, base: EngineSettings, opts: RunOptions, *, home: Path
) -> dict[str, object]:
    settings = _settings_for(base, exp)
    run_opts = replace(opts, concurrency=exp.concurrency or opts.concurrency)
    figures, layout = run_http_system(
        lambda port: loraplex_spec(settings, port=port, home=home), run_opts, label=f"tune-{name}"
    )
    return {
        "description": exp.description,
        "engine": settings.to_json(),
        "concurrency": run_opts.concurrency,
        "scenarios": figures,
        "process_layout": layout,
    }


def _peft_mixed_tps(path: Path | None) -> float | None:
    if path is None:
        return None
    doc = json.loads(path.read_text())
    return float(doc["results"]["peft"]["mixed"]["output_tokens_per_second"])


def summary_table(results: dict[str, dict[str, Any]], peft_tps: float | None) -> str:
    """One row per experiment and scenario; 'vs base' compares with the baseline's scenario,
    'vs peft' with the peft loop's mixed figure."""
    baseline = (results.get("baseline") or results.get("baseline#1") or {}).get("scenarios", {})
    lines = [f"{'experiment':<22} {'scenario':<8} {'tok/s':>7} {'vs base':>8} {'vs peft':>8} "
             f"{'TTFT p50':>10} {'worker s':>8} {'api s':>6} {'core s':>6} {'other CPU':>9}"]  # fmt: skip
    for name, r in results.items():
        for scenario, m in r["scenarios"].items():
            tps = m["output_tokens_per_second"]
            cpu = m.get("server_cpu_seconds", {})
            base_tps = baseline.get(scenario, {}).get("output_tokens_per_second")
            vs_base = f"{tps / base_tps:.2f}x" if base_tps else "-"
            vs_peft = f"{tps / peft_tps:.1f}x" if peft_tps and scenario == "mixed" else "-"
            flag = " *" if m.get("disturbed") else ""
            lines.append(
                f"{name:<22} {scenario:<8} {tps:>7} {vs_base:>8} {vs_peft:>8} "
                f"{m['ttft_median_ms']:>8}ms {cpu.get('worker', 0):>8} "
                f"{cpu.get('api_server', 0):>6} {cpu.get('engine_core', 0):>6} "
                f"{m['foreign_cpu_cores']:>9}{flag}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    home = (args.home or default_home()).expanduser()
    names = [n.strip() for n in args.experiments.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise SystemExit(f"error: unknown experiments {unknown}; known: {','.join(EXPERIMENTS)}")
    chosen = {n: EXPERIMENTS[n] for n in names} | dict(args.custom)
    scenarios = tuple(n.strip() for n in args.scenarios.split(",") if n.strip())
    if not scenarios or any(n not in SCENARIOS for n in scenarios):
        raise SystemExit(f"error: --scenarios {args.scenarios!r}; known: {','.join(SCENARIOS)}")
    started = utc_stamp()
    out = args.out or RESULTS_DIR / f"tuning-{started}.json"
    base = engine_settings(
        resolve_model(args.model, home), work_dir=args.work_dir.expanduser(), dtype=args.dtype
    )
    opts = RunOptions(
        requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
        scenarios=scenarios, work_dir=args.work_dir.expanduser(),
        busy_threshold_cores=args.busy_threshold,
    )  # fmt: skip
    peft_tps = _peft_mixed_tps(args.peft_json)
    results: dict[str, dict[str, Any]] = {}
    document: dict[str, object] = {
        "benchmark": "tuning", "started_utc": started, "command": " ".join(sys.argv),
        "machine": machine_info(base.dtype), "peft_mixed_output_tokens_per_second": peft_tps,
        "settings": {"requests": opts.requests, "concurrency": opts.concurrency,
                     "max_tokens": opts.max_tokens, "scenarios": list(scenarios)},
        "experiments": results,
    }  # fmt: skip
    # Repeats interleave (a, b, a, b) so that a slow drift of the machine hits every experiment.
    for round_ in range(1, args.repeat + 1):
        for name, exp in chosen.items():
            key = name if args.repeat == 1 else f"{name}#{round_}"
            results[key] = run_experiment(key, exp, base, opts, home=home)
            write_json(out, document)  # after each one: a long run keeps what it measured
    print(summary_table(results, peft_tps))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
