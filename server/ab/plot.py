"""`loraplex ab status --plot FILE`: the evidence over time, from the analysis passes' history.

Three panels: the primary metric's always-valid confidence sequence per candidate (difference
to the control, with the estimate and zero), the candidate's traffic share per ramp step, and
the guardrails' upper bounds against their margins.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path


def plot_status(status: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = status["history"]
    experiment = status["experiment"]
    config = experiment["config"]
    fig, (cs_ax, share_ax, guard_ax) = plt.subplots(
        3, 1, figsize=(9, 9), sharex=True, gridspec_kw={"height_ratios": [3, 1, 2]}
    )
    times = [datetime.fromisoformat(p["at"]) for p in history]
    versions = {str(v["index"]): v["version"] for v in experiment["variants"]}
    for index in sorted({k for p in history for k in p["comparisons"]}):
        points = [
            (t, p["comparisons"][index])
            for t, p in zip(times, history, strict=False)
            if index in p["comparisons"]
        ]
        ts = [t for t, _ in points]
        label = f"v{versions.get(index, index)} - control"
        lower = [max(c["lower"], -1) for _, c in points]
        upper = [min(c["upper"], 1) for _, c in points]
        cs_ax.fill_between(
            ts,
            lower,
            upper,
            alpha=0.25,
            step="post",
            label=f"{label}: {1 - config['alpha']:.0%} CS",
        )
        cs_ax.step(ts, [c["estimate"] for _, c in points], where="post", label=f"{label}: estimate")
        guard_ax.step(
            ts,
            [c["errors_upper"] for _, c in points],
            where="post",
            label=f"{label}: errors (upper)",
        )
        guard_ax.step(
            ts,
            [c["slow_upper"] for _, c in points],
            where="post",
            label=f"{label}: slow share (upper)",
        )
    cs_ax.axhline(0, color="black", linewidth=0.8)
    cs_ax.set_ylabel(f"{config['primary']} difference")
    cs_ax.set_title(
        f"experiment {experiment['id']} on {experiment['name']} ({experiment['status']})"
    )
    share_ax.step(times, [(p["share"] or 0) * 100 for p in history], where="post")
    share_ax.set_ylabel("candidate share %")
    for name, margin in config["guardrails"].items():
        guard_ax.axhline(margin, linestyle="--", linewidth=0.8, label=f"{name} margin {margin:g}")
    guard_ax.set_ylabel("guardrail bound")
    guard_ax.set_ylim(-0.05, 1.05)
    for ax in (cs_ax, guard_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    if not history:
        cs_ax.text(0.5, 0.5, "no analysis pass yet", ha="center", transform=cs_ax.transAxes)
    fig.autofmt_xdate()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
