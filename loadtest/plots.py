"""PNG plots of a run: latency percentiles per model, TTFT and throughput over time, goodput.

matplotlib (Agg backend) is imported inside `write_plots`, so loading the package and running a
test stay free of it. Reads the summary and the records; computes nothing the summary lacks,
except the time series.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from loadtest.runner import LoadResult

PLOT_FILES = (
    "latency_percentiles.png",
    "ttft_over_time.png",
    "throughput_over_time.png",
    "goodput.png",
)
_PCTS = ("p50", "p90", "p99")
_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def write_plots(result: LoadResult, summary: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in zip(
        PLOT_FILES, (_latency, _ttft_over_time, _throughput_over_time, _goodput), strict=True
    ):
        fig = draw(plt, result, summary)
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _num(value: float | None) -> float:
    return math.nan if value is None else value


def _latency(plt, result: LoadResult, summary: dict[str, Any]):
    models = list(summary["models"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    width = 0.8 / max(len(models), 1)
    for ax, (key, label) in zip(axes.flat, _METRICS, strict=True):
        for i, model in enumerate(models):
            dist = summary["models"][model][key]
            xs = [j + i * width for j in range(len(_PCTS))]
            ax.bar(xs, [_num(dist[p]) for p in _PCTS], width=width, label=model)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(_PCTS))], _PCTS)
        ax.set_title(f"{label} (ms)")
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    fig.suptitle("Latency percentiles per model")
    return fig


def _shade_excluded(ax, summary: dict[str, Any]) -> None:
    """Grey out send times whose requests the statistics leave out (warm-up, cool-down)."""
    w = summary["window"]
    label = "excluded (warm-up/cool-down)"
    if w["start_s"] > 0:
        ax.axvspan(0, w["start_s"], color="grey", alpha=0.15, label=label)
        label = None
    if w["send_cutoff_s"] < w["send_end_s"]:
        ax.axvspan(w["send_cutoff_s"], w["send_end_s"], color="grey", alpha=0.15, label=label)


def _ttft_over_time(plt, result: LoadResult, summary: dict[str, Any]):
    fig, ax = plt.subplots(figsize=(10, 4), constrained_layout=True)
    for model in summary["models"]:
        points = [
            (r.start - result.t0, r.ttft * 1000.0)
            for r in result.records
            if r.model == model and r.ok and r.ttft is not None
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, s=6, label=model)
    _shade_excluded(ax, summary)
    ax.set_xlabel("send time (s)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("TTFT over time")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def _throughput_over_time(plt, result: LoadResult, summary: dict[str, Any]):
    done = [r for r in result.records if r.ok]
    last = max((r.end - result.t0 for r in done), default=0.0)
    width = 1.0 if last >= 20 else max(last / 20, 0.01)  # 1 s bins, or 20 bins for short runs
    bins = max(1, math.ceil(last / width))
    requests, tokens = [0.0] * bins, [0.0] * bins
    for r in done:
        b = min(int((r.end - result.t0) / width), bins - 1)
        requests[b] += 1 / width
        tokens[b] += r.output_tokens / width
    edges = [i * width for i in range(bins + 1)]
    fig, ax = plt.subplots(figsize=(10, 4), constrained_layout=True)
    ax.step(edges, [*tokens, tokens[-1]], where="post", label="output tokens/s")
    ax.set_xlabel("completion time (s)")
    ax.set_ylabel("output tokens/s")
    ax2 = ax.twinx()
    ax2.step(
        edges,
        [*requests, requests[-1]],
        where="post",
        color="tab:orange",
        linestyle="--",
        label="requests/s",
    )
    ax2.set_ylabel("requests/s")
    ax.set_title(f"Throughput over time ({width:.3g} s bins, all completed requests)")
    ax.grid(alpha=0.3)
    fig.legend(loc="upper right", fontsize="small")
    return fig


def _goodput(plt, result: LoadResult, summary: dict[str, Any]):
    names = list(summary["models"]) + ["overall"]
    groups = [summary["models"][m] for m in summary["models"]] + [summary["overall"]]
    shares = [_num(g["goodput"]["share"]) * 100 for g in groups]
    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    ax.bar(names, shares, color=["tab:blue"] * (len(names) - 1) + ["tab:grey"])
    slos = summary["slos_ms"]
    text = ", ".join(f"{k} <= {v:g} ms" for k, v in slos.items()) or "no SLOs: success only"
    ax.set_title(f"Goodput: share of requests meeting all SLOs ({text})")
    ax.set_ylabel("% of measured requests")
    ax.set_ylim(0, 105)
    for i, g in enumerate(groups):
        rate = g["goodput"]["rate"]
        ax.annotate(f"{_num(rate):.2f}/s", (i, shares[i]), ha="center", va="bottom", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig
