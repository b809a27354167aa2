"""`loraplex loadtest`: parse flags, run the load with a live display, print and write the report.

Everything measurable lives in the library (runner, stats, report, plots); this module only turns
flags into `LoadSettings`, wires Ctrl-C to a clean stop, and renders progress with rich.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from loadtest.arrivals import ARRIVAL_KINDS, parse_arrival
from loadtest.report import print_summary, write_report
from loadtest.runner import LoadResult, LoadSettings, Progress, build_workload, run_load
from loadtest.stats import parse_slo
from loadtest.workload import CHAT, COMPLETIONS, Workload

INTERRUPTED_EXIT = 130


def loadtest(
    url: Annotated[
        str, typer.Option(help="Server root, e.g. http://127.0.0.1:8000 (/v1 optional).")
    ],
    model: Annotated[
        list[str], typer.Option("--model", help="A `model` to send; repeat for a mix.")
    ],
    mix: Annotated[
        str,
        typer.Option(help="uniform | round-robin | weights:3,1,1 | zipf:S over the --model list."),
    ] = "uniform",
    rate: Annotated[
        float | None, typer.Option(help="Open loop: requests/s (inf: all at once).")
    ] = None,
    arrival: Annotated[
        str, typer.Option(help=f"Open-loop arrivals: {', '.join(ARRIVAL_KINDS)}.")
    ] = "poisson",
    burstiness: Annotated[
        float, typer.Option(help="Gamma shape for arrivals (1 = Poisson).")
    ] = 1.0,
    concurrency: Annotated[
        int | None, typer.Option(help="Closed loop with C in flight; with --rate a cap.")
    ] = None,
    requests: Annotated[int | None, typer.Option(help="Stop after sending N requests.")] = None,
    duration: Annotated[float | None, typer.Option(help="Stop sending after SECONDS.")] = None,
    warmup: Annotated[
        float, typer.Option(help="Exclude requests sent in the first SECONDS.")
    ] = 0.0,
    cooldown: Annotated[
        float, typer.Option(help="Exclude requests sent in the last SECONDS.")
    ] = 0.0,
    prompts: Annotated[
        Path | None, typer.Option(help='JSONL: {"messages": [...]} or {"prompt": "..."}.')
    ] = None,
    prompt_order: Annotated[
        str, typer.Option(help="random: draw each prompt | sequential: in order, cycled.")
    ] = "random",
    input_len: Annotated[
        str, typer.Option(help="Synthetic prompt words: N | uniform:LO,HI | normal:M,S.")
    ] = "64",
    max_tokens: Annotated[
        str, typer.Option(help="Output tokens: N | uniform:LO,HI | normal:M,S.")
    ] = "128",
    endpoint: Annotated[
        str, typer.Option(help=f"For synthetic prompts: {CHAT} | {COMPLETIONS}.")
    ] = CHAT,
    ignore_eos: Annotated[
        bool, typer.Option(help="Send ignore_eos so outputs have exactly max_tokens.")
    ] = False,
    users: Annotated[
        int, typer.Option(help="Send `user` ids drawn from N sticky users (0: none).")
    ] = 0,
    seed: Annotated[
        int, typer.Option(help="Seed for prompts, mix, lengths, users and arrivals.")
    ] = 0,
    stream: Annotated[
        bool, typer.Option(help="Stream (SSE) responses; --no-stream times whole answers.")
    ] = True,
    slo: Annotated[
        list[str] | None, typer.Option(help="ttft=500ms, tpot=80ms, itl=..., e2e=2s; repeatable.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for summary.json, requests.csv, plots.")
    ] = None,
    plots: Annotated[bool, typer.Option(help="Write PNG plots into --out.")] = True,
    timeout: Annotated[float, typer.Option(help="Per-request timeout, seconds.")] = 600.0,
    api_key: Annotated[
        str | None, typer.Option(envvar="LORAPLEX_API_KEY", help="Bearer token.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary.json to stdout.")] = False,
) -> None:
    """Load-test an OpenAI-compatible server with a mix of adapters; report TTFT/TPOT/ITL/goodput."""
    err = Console(stderr=True)
    try:
        if endpoint not in (CHAT, COMPLETIONS):
            raise ValueError(f"--endpoint must be {CHAT} or {COMPLETIONS}, got {endpoint!r}")
        settings = LoadSettings(
            url=url, models=tuple(model), mix=mix, rate=rate,
            arrival=parse_arrival(arrival, burstiness=burstiness), burstiness=burstiness,
            concurrency=concurrency, requests=requests, duration=duration, warmup=warmup,
            cooldown=cooldown, prompts=prompts, prompt_order=prompt_order, input_len=input_len,
            output_len=max_tokens, endpoint=endpoint, ignore_eos=ignore_eos, users=users,
            seed=seed, stream=stream, timeout=timeout, api_key=api_key,
            slos=tuple(parse_slo(s) for s in slo or ()),
        )  # fmt: skip
        workload = build_workload(settings)
    except (ValueError, OSError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    result = _run_with_display(settings, workload, console=err)
    summary = write_report(result, out, plots=plots)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        print_summary(summary, Console())
        if out is not None:
            Console().print(f"wrote {out}/ ({', '.join(Path(f).name for f in summary['files'])})")
    if result.interrupted:
        raise typer.Exit(INTERRUPTED_EXIT)


def _progress_line(p: Progress) -> Text:
    return Text.assemble(
        (f"{p.elapsed:7.1f} s  ", "bold"),
        f"sent {p.sent}  ",
        ("finished ", "green"), f"{p.finished}  ",
        ("failed ", "red"), f"{p.failed}  ",
        f"in flight {p.in_flight}  ",
        f"now {p.request_rate:.1f} req/s, {p.token_rate:.0f} tok/s",
    )  # fmt: skip


def _run_with_display(
    settings: LoadSettings, workload: Workload, *, console: Console
) -> LoadResult:
    async def main(live: Live | None) -> LoadResult:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_sigint() -> None:
            console.print("stopping: cancelling requests in flight, writing a partial report")
            stop.set()
            loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C exits at once

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        on_progress = (lambda p: live.update(_progress_line(p))) if live else None
        return await run_load(settings, stop=stop, on_progress=on_progress, workload=workload)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        if console.is_terminal:
            with Live(Text("starting"), console=console, refresh_per_second=4) as live:
                return runner.run(main(live))
        return runner.run(main(None))


def _loop_factory():
    """uvloop when installed (it comes with uvicorn[standard]): less overhead per request."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
