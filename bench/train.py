"""Training speed and memory: `loraplex train` against TRL's SFTTrainer (its defaults) and a
plain peft loop, on the same examples with the same settings, measured in the same run.

Each run of each system is its own process (bench/_train_worker.py), so its peak RSS (the
child's own ru_maxrss, read with os.wait4) is that system's alone. Systems alternate and the
order rotates every round, so a noisy machine affects all alike; the median over the rounds is
reported. Tokens are counted the same way for all: non-padding input tokens processed by the
training call, per second of that call (model loading and tokenizing excluded). The CPU used by
other processes during each run is recorded next to it (`foreign_cpu_cores`).

Target (from the issue): loraplex at least TRL's tokens/s and at most its peak RSS.

    flock /tmp/loraplex-engine.lock .venv/bin/python bench/train.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import ForeignCpu, machine_info
from bench._report import write_json
from bench._train_worker import SYSTEMS
from bench._workload import PROMPTS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_VS_TRL_SPEED = 1.0  # loraplex tokens/s / TRL's, at least
TARGET_VS_TRL_MEMORY = 1.0  # loraplex peak RSS / TRL's, at most
_SENTENCES = (
    "Start with the basics and build from there.",
    "The short answer is that it depends on the context.",
    "Most people find that a little practice every day helps the most.",
    "Here is a simple way to think about it.",
    "Keep it small, keep it clear, and check your work.",
    "That is a common question, and the answer is simpler than it looks.",
    "Try it once by hand before you automate it.",
    "The details matter less than the habit.",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="HF model folder (default: embedded)")
    p.add_argument("--home", type=Path, default=None, help="loraplex data dir [$LORAPLEX_HOME]")
    p.add_argument("--examples", type=int, default=64, help="training examples")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="runs of each system (median reported)")
    p.add_argument("--only", default=",".join(SYSTEMS), help="systems, comma-separated")
    p.add_argument(
        "--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
        help="auto: bf16 where the CPU has it natively, else fp32 (as loraplex)",
    )  # fmt: skip
    p.add_argument(
        "--loraplex-arg", action="append", default=[],
        help="extra `loraplex train` argument (repeatable), for experiments",
    )  # fmt: skip
    p.add_argument(
        "--trl-override", action="append", default=[], type=_key_value,
        help="KEY=JSON SFTConfig override for experiments (e.g. gradient_checkpointing=false)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round, 3 steps")
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    return p


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=JSON, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not JSON ({e})") from e


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    systems = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise SystemExit(f"error: --only takes {', '.join(SYSTEMS)}; got {args.only!r}")
    args.only = systems
    if args.quick:
        args.rounds, args.steps = 1, 3
    for name in ("examples", "steps", "batch_size", "rounds", "rank"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    return args


def write_examples(path: Path, count: int, *, seed: int) -> Path:
    """`count` chat examples of two to five sentences, the same file for every system."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        answer = " ".join(rng.sample(_SENTENCES, rng.randint(2, 5)))
        messages = [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({i})"},
                    {"role": "assistant", "content": answer}]  # fmt: skip
        rows.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def run_one(spec: dict[str, object], work: Path) -> dict[str, object]:
    """One system, one run, in a fresh process: its figures and its own peak RSS."""
    spec_path = work / f"spec-{spec['system']}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    stdout_path, stderr_path = work / f"{spec['system']}.out", work / f"{spec['system']}.err"
    meter = ForeignCpu()
    meter.start()
    started = time.perf_counter()
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "bench._train_worker", str(spec_path)],
            cwd=Path(__file__).resolve().parent.parent, env=env, stdout=stdout, stderr=stderr,
        )  # fmt: skip
        # Reaped here, not by Popen.wait: os.wait4 also gives the child's own rusage.
        _pid, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    load = meter.stop()
    if child.returncode != 0:
        tail = stderr_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{spec['system']} exited {child.returncode}:\n{tail}")
    figures = json.loads(stdout_path.read_text().strip().splitlines()[-1])
    tokens, seconds = figures["tokens"], figures["seconds"]
    return figures | {
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "process_seconds": round(time.perf_counter() - started, 1),
        "foreign_cpu_cores": load.foreign_cpu_cores,
    }


def summarize(runs: dict[str, list[dict[str, object]]]) -> dict[str, dict[str, object]]:
    """Per system: the median tokens/s and peak RSS over its runs, and every run's figures."""
    out = {}
    for system, rows in runs.items():
        speeds = [r["tokens_per_second"] for r in rows if r["tokens_per_second"] is not None]
        out[system] = {
            "tokens_per_second": statistics.median(speeds) if speeds else None,
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rows),
            "tokens_per_run": statistics.median(r["tokens"] for r in rows),
            "runs": rows,
        }
    return out


def ratios(summary: dict[str, dict[str, object]]) -> dict[str, float | None]:
    def ratio(system: str, key: str) -> float | None:
        mine = summary.get("loraplex", {}).get(key)
        theirs = summary.get(system, {}).get(key)
        return round(mine / theirs, 3) if mine is not None and theirs else None

    return {
        "speed_loraplex_vs_trl": ratio("trl", "tokens_per_second"),
        "speed_loraplex_vs_peft": ratio("peft", "tokens_per_second"),
        "memory_loraplex_vs_trl": ratio("trl", "peak_rss_mib"),
        "memory_loraplex_vs_peft": ratio("peft", "peak_rss_mib"),
    }


def verdicts(ratio_row: dict[str, float | None]) -> dict[str, bool | None]:
    speed, memory = ratio_row["speed_loraplex_vs_trl"], ratio_row["memory_loraplex_vs_trl"]
    return {
        "speed_at_least_trl": None if speed is None else speed >= TARGET_VS_TRL_SPEED,
        "memory_at_most_trl": None if memory is None else memory <= TARGET_VS_TRL_MEMORY,
    }


def table(summary: dict[str, dict[str, object]], ratio_row: dict[str, float | None]) -> str:
    lines = [f"{'system':<9} {'tok/s':>8} {'peak RSS':>10} {'tokens/run':>10}  runs (tok/s)"]
    for system, row in summary.items():
        each = ", ".join(f"{r['tokens_per_second']}" for r in row["runs"])
        lines.append(
            f"{system:<9} {_fmt(row['tokens_per_second']):>8} "
            f"{_fmt(row['peak_rss_mib'], ' MiB'):>10} {_fmt(row['tokens_per_run']):>10}  {each}"
        )
    lines.append(
        f"loraplex/TRL: speed {_fmt(ratio_row['speed_loraplex_vs_trl'], 'x')}, memory "
        f"{_fmt(ratio_row['memory_loraplex_vs_trl'], 'x')}; loraplex/peft: speed "
        f"{_fmt(ratio_row['speed_loraplex_vs_peft'], 'x')}, memory "
        f"{_fmt(ratio_row['memory_loraplex_vs_peft'], 'x')}"
    )
    return "\n".join(lines)


def _fmt(value: object, suffix: str = "") -> str:
    return "-" if value is None else f"{value}{suffix}"


def rotation(systems: tuple[str, ...], rounds: int) -> list[tuple[str, ...]]:
    """The order of each round: the systems rotated by one more place every round."""
    return [systems[r % len(systems) :] + systems[: r % len(systems)] for r in range(rounds)]


def main(argv: list[str] | None = None) -> int:
    from bench.serving import default_home, resolve_model, utc_stamp
    from loraplex.hardware import choose_dtype

    args = parse_args(argv)
    home = (args.home or default_home()).expanduser()
    model = resolve_model(args.model, home)
    choice = choose_dtype(args.dtype, cuda=False)
    started = utc_stamp()
    out = args.out or RESULTS_DIR / f"train-{started}.json"
    runs: dict[str, list[dict[str, object]]] = {s: [] for s in args.only}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        data = write_examples(work / "train.jsonl", args.examples, seed=args.seed)
        common = {
            "model": str(model), "data": str(data), "steps": args.steps,
            "batch_size": args.batch_size, "max_seq_len": args.max_seq_len, "lr": args.lr,
            "seed": args.seed, "dtype": choice.dtype,
            "lora": {"rank": args.rank, "alpha": args.alpha, "dropout": 0.05,
                     "target_modules": args.target_modules.split(",")},
            "extra": args.loraplex_arg, "trl_overrides": dict(args.trl_override),
        }  # fmt: skip
        for number, order in enumerate(rotation(args.only, args.rounds), start=1):
            for system in order:
                figures = run_one(common | {"system": system}, work)
                runs[system].append(figures | {"round": number})
                print(f"round {number} {system:<9} {figures['tokens_per_second']} tok/s, "
                      f"peak {figures['peak_rss_mib']} MiB", flush=True)  # fmt: skip
    summary = summarize(runs)
    ratio_row = ratios(summary)
    document = {
        "benchmark": "train",
        "started_utc": started,
        "finished_utc": utc_stamp(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(choice.dtype) | {"dtype_reason": choice.reason},
        "settings": {k: v for k, v in common.items() if k not in ("model", "data")}
        | {
            "model": str(model),
            "examples": args.examples,
            "rounds": args.rounds,
            "systems": list(args.only),
        },  # fmt: skip
        "results": summary,
        "ratios": ratio_row,
        "targets_met": verdicts(ratio_row),
    }
    write_json(out, document)
    print(table(summary, ratio_row))
    print(f"targets: {document['targets_met']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
