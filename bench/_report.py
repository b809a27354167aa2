"""Ratios against the targets, the JSON result file, and the compact table printed at the end.

Targets (from the benchmark's issue): loraplex at least 0.97x raw vLLM's output throughput with at
most 5 ms added median TTFT, in every scenario; at least 10x the peft loop with adapters mixed.
"""

from __future__ import annotations

import json
from pathlib import Path

Figures = dict[str, dict[str, dict[str, object]]]  # system -> scenario -> figures

TARGET_VS_VLLM_THROUGHPUT = 0.97
TARGET_ADDED_TTFT_MS = 5.0
TARGET_VS_PEFT_MIXED = 10.0


def _get(figures: Figures, system: str, scenario: str, key: str) -> float | None:
    value = figures.get(system, {}).get(scenario, {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(figures: Figures, scenarios: tuple[str, ...]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for scenario in scenarios:
        tps = {s: _get(figures, s, scenario, "output_tokens_per_second") for s in figures}
        lp_ttft = _get(figures, "loraplex", scenario, "ttft_median_ms")
        vl_ttft = _get(figures, "vllm", scenario, "ttft_median_ms")
        row: dict[str, object] = {
            "loraplex_vs_vllm_throughput": _ratio(tps.get("loraplex"), tps.get("vllm")),
            "added_median_ttft_ms": (
                round(lp_ttft - vl_ttft, 1) if lp_ttft is not None and vl_ttft is not None else None
            ),
            "loraplex_vs_peft_throughput": _ratio(tps.get("loraplex"), tps.get("peft")),
            "vllm_vs_peft_throughput": _ratio(tps.get("vllm"), tps.get("peft")),
        }
        out[scenario] = row
    return out


def verdicts(ratio_rows: dict[str, dict[str, object]]) -> dict[str, bool | None]:
    """Whether each target is met, None where the figures to judge it are missing."""
    vs_vllm = [r["loraplex_vs_vllm_throughput"] for r in ratio_rows.values()]
    added = [r["added_median_ttft_ms"] for r in ratio_rows.values()]
    mixed = ratio_rows.get("mixed", {}).get("loraplex_vs_peft_throughput")
    return {
        "throughput_vs_vllm_at_least_0.97": (
            all(v >= TARGET_VS_VLLM_THROUGHPUT for v in vs_vllm)  # type: ignore[operator]
            if vs_vllm and None not in vs_vllm
            else None
        ),
        "added_median_ttft_at_most_5ms": (
            all(a <= TARGET_ADDED_TTFT_MS for a in added)  # type: ignore[operator]
            if added and None not in added
            else None
        ),
        "mixed_vs_peft_at_least_10x": (
            mixed >= TARGET_VS_PEFT_MIXED if isinstance(mixed, int | float) else None
        ),
    }


def write_json(path: Path, document: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def _fmt(value: object, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value}{suffix}"


def table(figures: Figures, ratio_rows: dict[str, dict[str, object]]) -> str:
    lines = [
        f"{'scenario':<8} {'system':<9} {'tok/s':>8} {'TTFT p50':>10} {'TTFT p90':>10} "
        f"{'e2e p50':>10} {'other CPU':>9}"
    ]
    order = {name: i for i, name in enumerate(("loraplex", "vllm", "peft"))}
    systems = sorted(figures, key=lambda name: order.get(name, len(order)))
    for scenario, row in ratio_rows.items():
        for system in systems:
            f = figures[system].get(scenario)
            if not f:
                continue
            flag = " *" if f.get("disturbed") else ""
            lines.append(
                f"{scenario:<8} {system:<9} {f['output_tokens_per_second']:>8} "
                f"{f['ttft_median_ms']:>8}ms {f['ttft_p90_ms']:>8}ms {f['e2e_median_ms']:>8}ms "
                f"{f['foreign_cpu_cores']:>9}{flag}"
            )
        lines.append(
            f"{'':<8} ratios: loraplex/vllm {_fmt(row['loraplex_vs_vllm_throughput'], 'x')}, "
            f"added TTFT p50 {_fmt(row['added_median_ttft_ms'], ' ms')}, "
            f"loraplex/peft {_fmt(row['loraplex_vs_peft_throughput'], 'x')}, "
            f"vllm/peft {_fmt(row['vllm_vs_peft_throughput'], 'x')}"
        )
    lines.append("(* measured while other processes used the CPU; see foreign_cpu_cores)")
    return "\n".join(lines)
