"""Statistics from request records: latency percentiles, throughput, goodput, errors.

Pure functions over `LoadResult`; no I/O. Which requests count: those sent inside the measurement
window [warmup, last send - cooldown] and not cancelled by a stop. Durations are reported in
milliseconds, rates per second of the window (window start to the last measured completion).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from loadtest.client import RequestRecord
from loadtest.runner import LoadResult

PERCENTILES = (50, 90, 95, 99)
SLO_METRICS = ("ttft", "tpot", "itl", "e2e")
_SLO_RE = re.compile(r"^(ttft|tpot|itl|e2e)=([0-9]*\.?[0-9]+)(ms|s)?$")


def parse_slo(text: str) -> tuple[str, float]:
    """`ttft=500ms`, `tpot=0.08s`, `e2e=2000` (bare numbers are ms) -> (metric, seconds)."""
    match = _SLO_RE.match(text.strip().lower())
    if not match:
        raise ValueError(
            f"--slo must be METRIC=VALUE[ms|s] with METRIC in {', '.join(SLO_METRICS)}; got {text!r}"
        )
    metric, value, unit = match.groups()
    return metric, float(value) / (1.0 if unit == "s" else 1000.0)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def distribution(values: Iterable[float]) -> dict[str, float | int | None]:
    """mean, p50..p99, min, max in milliseconds, and how many values they summarise."""
    ordered = sorted(v * 1000.0 for v in values)
    if not ordered:
        return {"count": 0, "mean": None, **{f"p{q}": None for q in PERCENTILES}, "max": None}
    out: dict[str, float | int | None] = {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered),
    }
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(ordered, q)
    out["min"], out["max"] = ordered[0], ordered[-1]
    return out


def window(result: LoadResult) -> tuple[float, float]:
    """[start, end) of send times (seconds from t0) whose requests are measured."""
    s = result.settings
    end = result.send_end - result.t0 - s.cooldown
    return s.warmup, end if s.cooldown > 0 else math.inf


def measured(result: LoadResult) -> list[RequestRecord]:
    lo, hi = window(result)
    out = []
    for r in result.records:
        rel = r.start - result.t0
        if not r.cancelled and r.start > 0 and lo <= rel < hi:
            out.append(r)
    return out


def meets_slos(record: RequestRecord, slos: Sequence[tuple[str, float]]) -> bool:
    """Succeeded and within every SLO; a metric a request lacks (no TTFT when not streamed) fails."""
    if not record.ok:
        return False
    for metric, limit in slos:
        if metric == "ttft":
            value = record.ttft
        elif metric == "tpot":
            # One output token: no decode phase, so nothing to violate.
            value = record.tpot if record.output_tokens > 1 else 0.0
        elif metric == "itl":
            value = max(record.itls, default=0.0) if record.ttft is not None else None
        else:
            value = record.e2e
        if value is None or value > limit:
            return False
    return True


def error_key(record: RequestRecord) -> str:
    """HTTP status for error responses, else the failure's name (timeout, ConnectError, ...)."""
    if record.status and record.status != 200:
        return str(record.status)
    return record.error or "unknown"


def group_stats(
    records: Sequence[RequestRecord], *, duration: float, slos: Sequence[tuple[str, float]]
) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    good = sum(1 for r in records if meets_slos(r, slos))
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: math.nan)
    stats: dict[str, Any] = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "errors_by_status": dict(sorted(Counter(error_key(r) for r in failed).items())),
        "output_tokens": out_tokens,
        "prompt_tokens": in_tokens,
        "request_throughput": per_s(len(ok)),
        "output_token_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(out_tokens + in_tokens),
        "ttft_ms": distribution(r.ttft for r in ok if r.ttft is not None),
        "tpot_ms": distribution(t for r in ok if (t := r.tpot) is not None),
        "itl_ms": distribution(g for r in ok for g in r.itls),
        "e2e_ms": distribution(r.e2e for r in ok),
        "goodput": {
            "good": good,
            "share": good / len(records) if records else math.nan,
            "rate": per_s(good),
        },
        "token_source": dict(Counter(r.token_source for r in ok if r.token_source)),
        "served_adapters": dict(Counter(r.served_adapter for r in ok if r.served_adapter)),
        "served_variants": dict(Counter(r.served_variant for r in ok if r.served_variant)),
    }
    return stats


def summarize(result: LoadResult) -> dict[str, Any]:
    """The whole `summary.json` document."""
    s = result.settings
    rows = measured(result)
    start = s.warmup
    end = max((r.end - result.t0 for r in rows), default=start)
    duration = max(end - start, 0.0)
    slos = list(s.slos)
    by_model: dict[str, list[RequestRecord]] = {m: [] for m in s.models}
    for r in rows:
        by_model.setdefault(r.model, []).append(r)
    return {
        "settings": s.to_json(),
        "interrupted": result.interrupted,
        "run_seconds": result.finished_at - result.t0,
        "window": {
            "start_s": start,
            "end_s": end,
            "duration_s": duration,
            "send_end_s": result.send_end - result.t0,
            "send_cutoff_s": min(window(result)[1], result.send_end - result.t0),
        },
        "sent": len(result.records),
        "cancelled": sum(1 for r in result.records if r.cancelled),
        "excluded_warmup_cooldown": sum(1 for r in result.records if not r.cancelled) - len(rows),
        "mix_shares": result.shares,
        "slos_ms": {m: v * 1000.0 for m, v in slos},
        "overall": group_stats(rows, duration=duration, slos=slos),
        "models": {
            model: group_stats(group, duration=duration, slos=slos)
            for model, group in by_model.items()
        },
    }
