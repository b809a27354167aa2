"""How loraplex's throughput and TTFT change as the traffic spreads over more adapters, as their
rank grows, and as more requests are in flight.

    LORAPLEX_HOME=~/.cache/loraplex-test .venv/bin/python bench/scaling.py \\
        [--sweeps adapters,concurrency,ranks] [--requests 48] [--concurrency 16] \\
        [--max-tokens 64] [--max-loras 8] [--zipf 1.1] [--dtype auto] [--out FILE.json]

Three sweeps against `loraplex serve` (HTTP, streamed, greedy, exactly --max-tokens output
tokens, driven by the `loadtest` library like every other HTTP figure of bench/):

* adapters: 1, 2, 4, 8, 16 and 64 distinct rank-16 adapters, each request's adapter drawn from
  Zipf(--zipf) popularity (rank r gets 1/r^s), with `--max-loras` engine slots (fewer than the
  16- and 64-adapter working sets) and a CPU LRU holding all 64; the base model alone first.
* concurrency: 1 to 32 requests in flight, base model, 8 adapters (as many as slots) and 64
  adapters (Zipf), same server: past --max-loras requests in flight, vLLM's scheduler must
  leave requests of adapters without a slot waiting.
* ranks: 8 adapters of rank 8, of rank 16, of rank 64, and a mixed-rank set (3 x r8, 3 x r16,
  2 x r64), Zipf, on one server allowing rank 64 (so only the adapters' rank differs).

Every point warms every model of its set up first (short requests, not counted), then measures;
each measurement waits for a quiet machine and is repeated when other processes disturbed it
(`bench._systems.on_quiet_machine`). Writes the JSON (with the machine: CPU model, flags, torch's
CPU capability, dtype) and the plots `<out>-adapters.png`, `-concurrency-8.png`,
`-concurrency-64.png` and `-ranks.png`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._adapters import ensure_rank_adapters
from bench._load import checked, mix_settings, run_settings, write_prompts
from bench._machine import machine_info
from bench._report import write_json
from bench._servers import EngineSettings, free_port, loraplex_spec, running
from bench._systems import RunOptions, _load_json, on_quiet_machine
from bench._workload import BASE_MODEL, PROMPTS, WorkItem
from bench.serving import (
    RESULTS_DIR,
    _csv,
    add_dtype_option,
    add_model_options,
    default_home,
    resolve_model,
    utc_stamp,
)
from loraplex.hardware import choose_dtype

SWEEPS = ("adapters", "concurrency", "ranks")
ADAPTER_COUNTS = (1, 2, 4, 8, 16, 64)
CONCURRENCIES = (1, 2, 4, 8, 16, 32)
RANKS = (8, 16, 64)
CONCURRENCY_SWEEP_ADAPTERS = (8, 64)  # within max_loras, and 8x more than its slots
CONCURRENCY_MIN_REQUESTS = 16  # and 4 rounds of the concurrency
MIXED_RANKS = ((8, 3), (16, 3), (64, 2))  # (rank, how many) in the mixed-rank set
WARMUP_MAX_TOKENS = 8


def _log(message: str) -> None:
    print(message, flush=True)


def measure_point(
    base_url: str, models: tuple[str, ...], *, mix: str, requests: int, concurrency: int,
    max_tokens: int, folder: Path, opts: RunOptions,
) -> dict[str, Any]:  # fmt: skip
    """One point: every model warmed up once, then `requests` requests with models drawn by
    `mix`, measured on a quiet machine. Figures from loadtest's summary."""
    prompts = write_prompts([WorkItem(i, BASE_MODEL, p) for i, p in enumerate(PROMPTS)],
                            folder / "prompts.jsonl")  # fmt: skip

    def measure() -> dict[str, Any]:
        warmup = mix_settings(
            base_url, models, mix="round-robin", requests=max(2, len(models)),
            concurrency=concurrency, max_tokens=WARMUP_MAX_TOKENS, prompts=prompts,
        )  # fmt: skip
        checked(run_settings(warmup, folder / "warmup"))
        measured = mix_settings(
            base_url, models, mix=mix, requests=requests, concurrency=concurrency,
            max_tokens=max_tokens, prompts=prompts,
        )  # fmt: skip
        return _figures(checked(run_settings(measured, folder / "measured")))

    figures, load, attempt = on_quiet_machine(measure, opts)
    figures |= _load_json(load) | {"attempt": attempt}
    figures["disturbed"] = load.foreign_cpu_cores >= opts.busy_threshold_cores
    _log(
        f"  {folder.name}: {figures['output_tokens_per_second']} tok/s, TTFT p50/p99 "
        f"{figures['ttft_p50_ms']}/{figures['ttft_p99_ms']} ms, "
        f"{figures['distinct_models']} models seen, other CPU {figures['foreign_cpu_cores']}"
    )
    return figures


def _figures(summary: dict[str, Any]) -> dict[str, Any]:
    overall = summary["overall"]
    per_model = {n: g["completed"] for n, g in summary["models"].items() if g["completed"]}
    return {
        "requests": overall["completed"],
        "output_tokens_per_second": round(overall["output_token_throughput"], 2),
        "ttft_p50_ms": round(overall["ttft_ms"]["p50"], 1),
        "ttft_p90_ms": round(overall["ttft_ms"]["p90"], 1),
        "ttft_p99_ms": round(overall["ttft_ms"]["p99"], 1),
        "e2e_p50_ms": round(overall["e2e_ms"]["p50"], 1),
        "wall_seconds": round(summary["window"]["duration_s"], 3),
        "distinct_models": len(per_model),
        "requests_per_model": per_model,
    }


def requests_for(concurrency: int, requests: int) -> int:
    """At least `requests`, and at least 4 rounds of `concurrency` (so a wide point is not one
    batch's start and tail)."""
    return max(requests, 4 * concurrency)


def run_rank16(
    settings: EngineSettings, names: tuple[str, ...], sweeps: tuple[str, ...],
    args: argparse.Namespace, opts: RunOptions, home: Path,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The adapters and concurrency sweeps, on one server holding every rank-16 adapter."""
    out: dict[str, dict[str, Any]] = {}
    port = free_port()
    folder = opts.work_dir / "scaling"
    _log(f"loraplex with {len(names)} rank-16 adapters, max_loras {settings.max_loras}")
    with running(loraplex_spec(settings, port=port, home=home), port=port,
                 log_path=folder / "logs" / "rank16.log") as server:  # fmt: skip

        def point(models: tuple[str, ...], concurrency: int, label: str, requests: int) -> dict:
            return measure_point(
                server.base_url, models, mix=f"zipf:{args.zipf}",
                requests=requests_for(concurrency, requests), concurrency=concurrency,
                max_tokens=args.max_tokens, folder=folder / label, opts=opts,
            )  # fmt: skip

        if "adapters" in sweeps:
            rows = {"base": point((BASE_MODEL,), args.concurrency, "adapters-base", args.requests)}
            for count in ADAPTER_COUNTS:  # Zipf over the first `count`
                rows[str(count)] = point(
                    names[:count], args.concurrency, f"adapters-{count}", args.requests
                )
            out["adapters"] = rows
        if "concurrency" in sweeps:
            rows = {}
            for concurrency in CONCURRENCIES:
                for count in (0, *CONCURRENCY_SWEEP_ADAPTERS):
                    models = names[:count] if count else (BASE_MODEL,)
                    label = str(count) if count else "base"
                    rows[f"{label}@{concurrency}"] = point(
                        models, concurrency, f"c{concurrency}-{label}", CONCURRENCY_MIN_REQUESTS
                    )
            out["concurrency"] = rows
    return out


def run_ranks(
    settings: EngineSettings, sets: dict[str, tuple[str, ...]], args: argparse.Namespace,
    opts: RunOptions, home: Path,
) -> dict[str, Any]:  # fmt: skip
    """The ranks sweep: one server allowing the largest rank, every set measured on it."""
    port = free_port()
    folder = opts.work_dir / "scaling"
    _log(f"loraplex with adapters of ranks {RANKS}, max_lora_rank {settings.max_lora_rank}")
    rows: dict[str, Any] = {}
    with running(loraplex_spec(settings, port=port, home=home), port=port,
                 log_path=folder / "logs" / "ranks.log") as server:  # fmt: skip
        for label, models in {"base": (BASE_MODEL,), **sets}.items():
            rows[label] = measure_point(
                server.base_url, models, mix=f"zipf:{args.zipf}", requests=args.requests,
                concurrency=args.concurrency, max_tokens=args.max_tokens,
                folder=folder / f"ranks-{label}", opts=opts,
            )  # fmt: skip
    return rows


def plot(document: dict[str, Any], stem: Path) -> list[Path]:
    """One PNG per sweep that ran: throughput (left axis) and TTFT p50/p99 (right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machine = document["machine"]
    subtitle = (f"{machine.get('cpu_model')}, {machine.get('torch_cpu_capability')}, "
                f"{machine.get('dtype')}; Zipf({document['settings']['zipf']})")  # fmt: skip
    written = []
    sweeps = document["results"]

    def figure(name: str, xs: list[Any], rows: list[dict[str, Any]], label: str,
               xlabel: str, base: dict[str, Any] | None, logx: bool) -> None:  # fmt: skip
        fig, tps_axes = plt.subplots(figsize=(8, 4.8))
        ttft_axes = tps_axes.twinx()
        tps_axes.plot(xs, [r["output_tokens_per_second"] for r in rows], "o-", color="tab:blue",
                      label=f"{label} tok/s")  # fmt: skip
        ttft_axes.plot(xs, [r["ttft_p50_ms"] for r in rows], "s--", color="tab:orange",
                       label=f"{label} TTFT p50")  # fmt: skip
        ttft_axes.plot(xs, [r["ttft_p99_ms"] for r in rows], "^:", color="tab:red",
                       label=f"{label} TTFT p99")  # fmt: skip
        if isinstance(base, dict):
            tps_axes.axhline(base["output_tokens_per_second"], color="tab:blue", alpha=0.4,
                             label="base model tok/s")  # fmt: skip
        elif isinstance(base, list):
            tps_axes.plot(xs, [r["output_tokens_per_second"] for r in base], "o-",
                          color="tab:green", label="base model tok/s")  # fmt: skip
        if logx:
            tps_axes.set_xscale("log", base=2)
            tps_axes.set_xticks(xs, [str(x) for x in xs])
        tps_axes.set_xlabel(xlabel)
        tps_axes.set_ylabel("output tokens/s")
        ttft_axes.set_ylabel("TTFT (ms)")
        tps_axes.set_ylim(bottom=0)
        ttft_axes.set_ylim(bottom=0)
        handles = tps_axes.get_lines() + ttft_axes.get_lines()
        tps_axes.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=8)
        fig.suptitle(f"loraplex: {name}\n{subtitle}", fontsize=10)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{name.split()[0]}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if "adapters" in sweeps:
        rows = sweeps["adapters"]
        counts = [c for c in ADAPTER_COUNTS if str(c) in rows]
        figure(f"adapters in the traffic (max_loras {document['settings']['max_loras']})",
               counts, [rows[str(c)] for c in counts], "adapters", "distinct adapters",
               rows.get("base"), True)  # fmt: skip
    if "concurrency" in sweeps:
        rows = sweeps["concurrency"]
        for n in CONCURRENCY_SWEEP_ADAPTERS:
            levels = [c for c in CONCURRENCIES if f"{n}@{c}" in rows]
            figure(f"concurrency-{n} ({n} adapters, max_loras {document['settings']['max_loras']})",
                   levels, [rows[f"{n}@{c}"] for c in levels], f"{n} adapters",
                   "requests in flight", [rows[f"base@{c}"] for c in levels], True)  # fmt: skip
    if "ranks" in sweeps:
        rows = sweeps["ranks"]
        labels = [k for k in rows if k != "base"]
        figure("ranks (8 adapters each)", labels, [rows[k] for k in labels], "8 adapters",
               "adapter ranks", rows.get("base"), False)  # fmt: skip
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sweeps", type=_csv(SWEEPS), default=SWEEPS)
    p.add_argument("--requests", type=int, default=48, help="measured requests per point (min)")
    p.add_argument("--concurrency", type=int, default=16, help="in flight, adapters/ranks sweeps")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-loras", type=int, default=8, help="engine adapter slots")
    p.add_argument("--zipf", type=float, default=1.1, help="adapter popularity exponent")
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--busy-threshold", type=float, default=0.3)
    p.add_argument("--out", type=Path, default=None)
    add_dtype_option(p)
    add_model_options(p, work_dir_help="adapters, logs and loadtest output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    home = (args.home or default_home()).expanduser()
    work_dir = args.work_dir.expanduser()
    started = utc_stamp()
    out = args.out or RESULTS_DIR / f"scaling-{started}.json"
    model_dir = resolve_model(args.model, home)
    dtype = choose_dtype(args.dtype).dtype
    opts = RunOptions(requests=args.requests, concurrency=args.concurrency,
                      max_tokens=args.max_tokens, scenarios=args.sweeps, work_dir=work_dir,
                      busy_threshold_cores=args.busy_threshold)  # fmt: skip
    adapters_dir = work_dir / "adapters"
    results: dict[str, Any] = {}
    engines: dict[str, Any] = {}
    common = {"model_dir": model_dir, "max_loras": args.max_loras, "dtype": dtype,
              "kv_cache_gib": args.kv_cache_gib}  # fmt: skip
    if {"adapters", "concurrency"} & set(args.sweeps):
        rank16 = ensure_rank_adapters(model_dir, adapters_dir, rank=16, count=max(ADAPTER_COUNTS))
        settings = EngineSettings(adapters=rank16, max_lora_rank=16,
                                  max_cpu_loras=len(rank16) + 8, **common)  # fmt: skip
        engines["rank16"] = settings.to_json()
        results |= run_rank16(settings, tuple(rank16), args.sweeps, args, opts, home)
    if "ranks" in args.sweeps:
        by_rank = {r: ensure_rank_adapters(model_dir, adapters_dir, rank=r, count=8) for r in RANKS}
        sets = {f"r{r}": tuple(by_rank[r]) for r in RANKS}
        sets["mixed"] = tuple(n for r, k in MIXED_RANKS for n in tuple(by_rank[r])[:k])
        adapters = {n: p for folders in by_rank.values() for n, p in folders.items()}
        settings = EngineSettings(adapters=adapters, max_lora_rank=max(RANKS),
                                  max_cpu_loras=len(adapters) + 8, **common)  # fmt: skip
        engines["ranks"] = settings.to_json()
        results["ranks"] = run_ranks(settings, sets, args, opts, home)
    document: dict[str, Any] = {
        "benchmark": "scaling",
        "started_utc": started,
        "finished_utc": utc_stamp(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(dtype),
        "settings": {
            "sweeps": list(args.sweeps),
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "max_loras": args.max_loras,
            "zipf": args.zipf,
            "temperature": 0.0,
            "ignore_eos": True,
            "prompts": len(PROMPTS),
            "engines": engines,
        },  # fmt: skip
        "results": results,
    }
    write_json(out, document)
    for path in plot(document, out.with_suffix("")):
        print(f"wrote {path}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
