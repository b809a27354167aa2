"""Write a run's results: `summary.json`, per-request `requests.csv`, and a rich table.

Takes the summary from stats and the records from the runner; plots live in plots.py.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadtest.runner import LoadResult
from loadtest.stats import measured, meets_slos, summarize

SUMMARY_FILE = "summary.json"
REQUESTS_FILE = "requests.csv"
CSV_COLUMNS = (
    "index", "model", "user", "in_window", "start_s", "end_s", "status", "error",
    "ttft_ms", "tpot_ms", "e2e_ms", "itl_mean_ms", "itl_max_ms", "chunks", "output_tokens",
    "prompt_tokens", "token_source", "max_tokens", "served_adapter", "served_variant", "meets_slos",
)  # fmt: skip


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write null (and "inf" for an unbounded rate)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_summary(summary: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SUMMARY_FILE
    path.write_text(json.dumps(_json_safe(summary), indent=2, sort_keys=True) + "\n")
    return path


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000.0:.3f}"


def write_requests_csv(result: LoadResult, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REQUESTS_FILE
    inside = {id(r) for r in measured(result)}
    slos = list(result.settings.slos)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in result.records:
            sent = r.start > 0
            itls = r.itls
            writer.writerow(
                (
                    r.index, r.model, r.user or "", int(id(r) in inside),
                    f"{r.start - result.t0:.6f}" if sent else "",
                    f"{r.end - result.t0:.6f}" if sent else "",
                    r.status, r.error, _ms(r.ttft), _ms(r.tpot), _ms(r.e2e) if sent else "",
                    _ms(sum(itls) / len(itls)) if itls else "", _ms(max(itls)) if itls else "",
                    r.chunks, r.output_tokens,
                    "" if r.prompt_tokens is None else r.prompt_tokens,
                    r.token_source, r.max_tokens, r.served_adapter, r.served_variant,
                    int(meets_slos(r, slos)),
                )
            )  # fmt: skip
    return path


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def summary_table(summary: dict[str, Any]) -> Table:
    """Metrics down, one column per model plus `overall`, so many models still fit a terminal."""
    title = "loadtest" + (" (interrupted: partial results)" if summary["interrupted"] else "")
    table = Table(title=title)
    groups = {**summary["models"], "overall": summary["overall"]}
    table.add_column("metric")
    for name in groups:
        table.add_column(name, justify="right")

    def row(label: str, cell, *, end_section: bool = False) -> None:
        table.add_row(label, *(cell(g) for g in groups.values()), end_section=end_section)

    row("requests ok / failed", lambda g: f"{g['completed']} / {g['failed']}")
    row("requests/s", lambda g: _fmt(g["request_throughput"], 2))
    row("output tokens/s", lambda g: _fmt(g["output_token_throughput"], 1), end_section=True)
    for key, label in (
        ("ttft_ms", "TTFT"),
        ("tpot_ms", "TPOT"),
        ("itl_ms", "ITL"),
        ("e2e_ms", "E2E"),
    ):
        for stat in ("mean", "p50", "p90", "p99"):
            row(
                f"{label} {stat} ms",
                lambda g, key=key, stat=stat: _fmt(g[key][stat]),
                end_section=stat == "p99",
            )
    row("goodput share", lambda g: _fmt(_pct(g["goodput"]["share"]), 1) + " %")
    row("goodput req/s", lambda g: _fmt(g["goodput"]["rate"], 2))
    row("errors", lambda g: " ".join(f"{k}:{v}" for k, v in g["errors_by_status"].items()) or "-")
    return table


def _pct(share: float | None) -> float | None:
    return None if share is None else share * 100.0


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(summary))
    w = summary["window"]
    console.print(
        f"measured {summary['overall']['requests']} of {summary['sent']} sent "
        f"(window {w['start_s']:.2f}-{w['end_s']:.2f} s; {summary['cancelled']} cancelled, "
        f"{summary['excluded_warmup_cooldown']} in warm-up/cool-down)"
    )


def write_report(result: LoadResult, out_dir: Path | None, *, plots: bool = True) -> dict[str, Any]:
    """Summarise `result`; with `out_dir`, write summary.json, requests.csv and (optionally) PNGs."""
    summary = summarize(result)
    if out_dir is not None:
        files = [write_summary(summary, out_dir), write_requests_csv(result, out_dir)]
        if plots:
            from loadtest.plots import write_plots

            files += write_plots(result, summary, out_dir)
        summary["files"] = [str(p) for p in files]
        write_summary(summary, out_dir)
    return summary
