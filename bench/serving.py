"""Serving benchmark: loraplex vs vLLM's own OpenAI server vs a transformers + peft loop, and vs
llama.cpp's llama-server (the embedded model's Q4_1 GGUF, the adapters converted to GGUF LoRA).

The same workload runs against each system: 16 fixed chat prompts (cycled), greedy, a fixed
number of output tokens (`ignore_eos`), streamed, `--concurrency` requests in flight (closed
loop; the two servers are driven by the `loadtest` library, see bench/_load.py); scenarios: the
base model only, one adapter, four adapters round-robin ("mixed") and, on request, eight
("mixed8"). The vLLM-based servers compute in
the dtype `loraplex serve` chooses for this CPU (`--dtype` to override), the peft loop too
(`--peft-dtype`); the result records the CPU and the dtype.
Per scenario it records output tokens/s (all output tokens / wall time), median and p90 time to
first content token, median end-to-end latency, and how much CPU other processes used meanwhile.
It writes one JSON file and prints the ratios against the targets (see bench/README.md).

    .venv/bin/python bench/serving.py --requests 32 --concurrency 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._adapters import ADAPTER_NAMES, ALPHA, RANK, TARGET_MODULES, ensure_adapters
from bench._llamacpp import (
    adapter_check,
    base_gguf,
    converted_adapters,
    cpu_cores,
    llamacpp_spec,
    make_measure,
)
from bench._machine import machine_info
from bench._report import Figures, ratios, table, verdicts, write_json
from bench._servers import PATCH_FLAG, EngineSettings, loraplex_spec, vllm_spec
from bench._systems import RunOptions, run_http_system, run_peft
from bench._workload import BASE_MODEL, PROMPTS, SCENARIOS
from loraplex.hardware import DTYPES, choose_dtype

SYSTEMS = ("loraplex", "vllm", "peft", "llamacpp")
DEFAULT_SYSTEMS = ("loraplex", "vllm", "peft")  # llamacpp on request (the bench extra)
DEFAULT_SCENARIOS = ("base", "one", "mixed")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_home() -> Path:
    return Path(os.environ.get("LORAPLEX_HOME", "~/.loraplex")).expanduser()


def utc_stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def _csv(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(value: str) -> tuple[str, ...]:
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        unknown = [v for v in items if v not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(allowed)}, got {value!r}"
            )
        return items

    return parse


def _env_pair(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, val


def add_dtype_option(p: argparse.ArgumentParser, *, what: str = "engine") -> None:
    p.add_argument(
        "--dtype", choices=DTYPES, default="auto",
        help=f"{what} dtype; auto: bf16 where the CPU has it natively, else fp32 (as loraplex)",
    )  # fmt: skip


def add_model_options(p: argparse.ArgumentParser, *, work_dir_help: str) -> None:
    """--model, --home and --work-dir, shared by the benchmarks that start an engine."""
    p.add_argument("--model", type=Path, default=None, help="HF model folder (default: embedded)")
    p.add_argument("--home", type=Path, default=None, help="loraplex data dir [$LORAPLEX_HOME]")
    p.add_argument(
        "--work-dir", type=Path, default=Path("~/.cache/loraplex-bench"), help=work_dir_help
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=32, help="measured requests per scenario")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (HTTP systems)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    p.add_argument(
        "--only", type=_csv(SYSTEMS), default=DEFAULT_SYSTEMS,
        help=f"systems to run, from {','.join(SYSTEMS)} (default: {','.join(DEFAULT_SYSTEMS)})",
    )  # fmt: skip
    p.add_argument(
        "--scenarios",
        type=_csv(tuple(SCENARIOS)),
        default=DEFAULT_SCENARIOS,
        help=f"scenarios, from {','.join(SCENARIOS)} (mixed8: 8 adapters, give --max-loras 8)",
    )
    add_model_options(p, work_dir_help="bench adapters and server logs")
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument(
        "--env", type=_env_pair, action="append", default=[],
        help="KEY=VALUE for both servers' environment (e.g. VLLM_CPU_NUM_OF_RESERVED_CPU=0)",
    )  # fmt: skip
    p.add_argument(
        "--reuse-from", type=Path, default=None,
        help="take the figures of systems not run (see --only) from this earlier result",
    )  # fmt: skip
    add_dtype_option(p, what="both servers' engine")
    p.add_argument(
        "--peft-dtype", choices=("auto", "probe", "float32", "bfloat16"), default="auto",
        help="peft loop dtype; auto: as --dtype auto; probe: time fp32 and bf16, keep the faster",
    )  # fmt: skip
    p.add_argument(
        "--busy-threshold", type=float, default=0.3,
        help="CPU cores other processes may use before a measurement is redone",
    )  # fmt: skip
    return p


def resolve_model(model: Path | None, home: Path) -> Path:
    folder = (model or home / "models" / "smollm2-135m-instruct").expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: no model at {folder}; run `loraplex model prepare` or --model")
    return folder


def engine_settings(
    model_dir: Path, *, work_dir: Path, max_loras: int = 4, max_num_seqs: int = 32,
    kv_cache_gib: int = 2, env: dict[str, str] | None = None, dtype: str = "auto",
    adapter_names: tuple[str, ...] = ADAPTER_NAMES,
) -> EngineSettings:  # fmt: skip
    """The shared engine settings, with the bench adapters (created on first use)."""
    return EngineSettings(
        dtype=choose_dtype(dtype).dtype,
        model_dir=model_dir,
        adapters=ensure_adapters(model_dir, work_dir / "adapters", adapter_names),
        max_loras=max_loras,
        max_num_seqs=max_num_seqs,
        kv_cache_gib=kv_cache_gib,
        extra_env=dict(env or {}),
    )


def run_systems(
    settings: EngineSettings, opts: RunOptions, *, only: tuple[str, ...], home: Path,
    peft_dtype: str,
) -> tuple[Figures, dict[str, object]]:  # fmt: skip
    figures: Figures = {}
    extra: dict[str, object] = {}
    layouts: dict[str, object] = {}
    if "loraplex" in only:
        figures["loraplex"], layouts["loraplex"] = run_http_system(
            lambda port: loraplex_spec(settings, port=port, home=home), opts, label="loraplex"
        )
    if "vllm" in only:
        figures["vllm"], layouts["vllm"] = run_http_system(
            lambda port: vllm_spec(settings, port=port), opts, label="vllm"
        )
    if layouts:
        extra["process_layout"] = layouts
    if "peft" in only:
        figures["peft"], extra["peft"] = run_peft(settings, opts, dtype=peft_dtype)
    if "llamacpp" in only:
        figures["llamacpp"], layouts["llamacpp"], extra["llamacpp"] = run_llamacpp(settings, opts)
        extra["process_layout"] = layouts
    return figures, extra


def run_llamacpp(
    settings: EngineSettings, opts: RunOptions
) -> tuple[dict[str, dict[str, object]], list[dict[str, object]], dict[str, object]]:
    """llama-server on the embedded model's GGUF, every bench adapter converted and loaded; the
    adapters' effect on its answers is checked before anything is measured."""
    gguf = base_gguf(opts.work_dir)
    loras = converted_adapters(settings.adapters, gguf, opts.work_dir / "gguf-lora")
    info: dict[str, object] = {
        "server": "llama-server embedded in xllamacpp", "model_gguf": str(gguf),
        "loras": {k: str(v) for k, v in loras.items()}, "parallel": opts.concurrency,
        "threads": cpu_cores(), "cache_ram_mib": 0, "context_per_slot": 2048,
        "request_lora": "every adapter, scale 1 for the request's model, 0 for the others",
    }  # fmt: skip

    def check(base_url: str) -> None:
        info["adapter_check"] = adapter_check(base_url, tuple(loras))

    figures, layout = run_http_system(
        lambda port: llamacpp_spec(model=gguf, loras=loras, port=port, parallel=opts.concurrency),
        opts, label="llamacpp", measure_with=make_measure(tuple(loras)), on_ready=check,
    )  # fmt: skip
    return figures, layout, info


def llamacpp_ratios(figures: Figures, scenarios: tuple[str, ...]) -> dict[str, dict[str, object]]:
    """loraplex / llama.cpp throughput and the two median TTFTs, per scenario."""
    rows: dict[str, dict[str, object]] = {}
    for scenario in scenarios:
        lp = figures.get("loraplex", {}).get(scenario, {})
        lc = figures.get("llamacpp", {}).get(scenario, {})
        if not lp or not lc:
            continue
        rows[scenario] = {
            "loraplex_vs_llamacpp_throughput": round(
                float(lp["output_tokens_per_second"]) / float(lc["output_tokens_per_second"]), 3
            ),
            "loraplex_ttft_median_ms": lp["ttft_median_ms"],
            "llamacpp_ttft_median_ms": lc["ttft_median_ms"],
        }
    return rows


def reuse_figures(figures: Figures, path: Path, scenarios: tuple[str, ...]) -> list[str]:
    """Add the systems missing from `figures` from an earlier result file; return their names."""
    earlier = json.loads(path.read_text())["results"]
    added = [s for s in earlier if s not in figures]
    for system in added:
        figures[system] = {k: v for k, v in earlier[system].items() if k in scenarios}
    return added


def settings_json(
    opts: RunOptions, settings: EngineSettings, *, reused: dict[str, object] | None
) -> dict[str, object]:
    return {
        "requests": opts.requests,
        "concurrency": opts.concurrency,
        "max_tokens": opts.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "prompts": len(PROMPTS),
        "scenarios": {s: list(SCENARIOS[s]) for s in opts.scenarios},
        "adapters": {
            "names": list(ADAPTER_NAMES),
            "rank": RANK,
            "alpha": ALPHA,
            "target_modules": list(TARGET_MODULES),
        },
        "engine": settings.to_json(),
        "vllm_server": {"patched_by_loraplex": False, "env_removed": PATCH_FLAG},
        "busy_threshold_cores": opts.busy_threshold_cores,
        "reused": reused,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    home = (args.home or default_home()).expanduser()
    started = utc_stamp()
    out = args.out or RESULTS_DIR / f"serving-{started}.json"
    if "llamacpp" in args.only and args.model is not None:
        raise SystemExit("error: llamacpp serves the embedded model's GGUF only; drop --model")
    names = tuple(dict.fromkeys(m for s in args.scenarios for m in SCENARIOS[s] if m != BASE_MODEL))
    settings = engine_settings(
        resolve_model(args.model, home), work_dir=args.work_dir.expanduser(),
        max_loras=args.max_loras, max_num_seqs=args.max_num_seqs,
        kv_cache_gib=args.kv_cache_gib, env=dict(args.env), dtype=args.dtype,
        adapter_names=names or ADAPTER_NAMES,
    )  # fmt: skip
    opts = RunOptions(
        requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
        scenarios=args.scenarios, work_dir=args.work_dir.expanduser(),
        busy_threshold_cores=args.busy_threshold,
    )  # fmt: skip
    figures, extra = run_systems(
        settings, opts, only=args.only, home=home, peft_dtype=args.peft_dtype
    )
    reused = reuse_figures(figures, args.reuse_from, opts.scenarios) if args.reuse_from else []
    ratio_rows = ratios(figures, opts.scenarios)
    vs_llamacpp = llamacpp_ratios(figures, opts.scenarios)
    reuse_note = {"from": str(args.reuse_from), "systems": reused} if reused else None
    document: dict[str, object] = {
        "benchmark": "serving",
        "started_utc": started,
        "finished_utc": utc_stamp(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(settings.dtype),
        "settings": {**settings_json(opts, settings, reused=reuse_note), **extra},
        "results": figures,
        "ratios": ratio_rows,
        "ratios_vs_llamacpp": vs_llamacpp,
        "targets_met": verdicts(ratio_rows),
    }
    write_json(out, document)
    print(table(figures, ratio_rows))
    for scenario, row in vs_llamacpp.items():
        print(
            f"{scenario:<8} loraplex/llamacpp {row['loraplex_vs_llamacpp_throughput']}x, TTFT p50 "
            f"{row['loraplex_ttft_median_ms']} / {row['llamacpp_ttft_median_ms']} ms"
        )
    if reused:
        print(f"figures of {', '.join(reused)} reused from {args.reuse_from}")
    print(f"targets: {document['targets_met']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
