"""`loraplex ab ...`: start, inspect and end A/B experiments in the registry database.

Servers pick a change up within a couple of seconds (they poll the registry); nothing here
talks to a server. Exit codes as `loraplex registry`: 2 for a refused request, 1 when the
database is unavailable. `--json` prints machine-readable results on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from registry.cli import (
    ActorOpt,
    ArtifactsOpt,
    HomeOpt,
    JsonOpt,
    ReasonOpt,
    RegistryOpt,
    default_actor,
    emit,
    fail,
    opened_registry,
    print_table,
)

app = typer.Typer(
    help="A/B experiments: split a name's traffic between versions, watch, promote or roll back.",
    no_args_is_help=True,
)


@app.command("start")
def start_command(
    name: Annotated[str, typer.Argument(help="adapter name (clients call model=NAME)")],
    control: Annotated[int | None, typer.Option(help="the version serving now")] = None,
    candidate: Annotated[int | None, typer.Option(help="the version to try")] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant", help="VERSION=WEIGHT, repeatable: a static split (first = control)"
        ),
    ] = None,
    ramp: Annotated[
        str | None, typer.Option(help="candidate's traffic share per step, % [1,5,10,25,50]")
    ] = None,
    auto: Annotated[
        bool, typer.Option("--auto", help="promote / roll back on the evidence")
    ] = False,
    primary: Annotated[str, typer.Option(help="metric promotion is decided on")] = "feedback",
    guardrail: Annotated[
        list[str] | None,
        typer.Option(
            "--guardrail",
            help="errors | latency-p95, optionally =MARGIN (repeatable) [both, default margins]",
        ),
    ] = None,  # fmt: skip
    no_guardrails: Annotated[bool, typer.Option("--no-guardrails")] = False,
    alpha: Annotated[float, typer.Option(help="error rate of each decision")] = 0.05,
    window: Annotated[
        float, typer.Option(help="seconds observed per user from first exposure")
    ] = 3600,
    dwell: Annotated[float, typer.Option(help="minimum seconds per ramp step")] = 1800,
    final_dwell: Annotated[float, typer.Option(help="minimum seconds at the last step")] = 7200,
    min_users: Annotated[
        int, typer.Option(help="users per arm with closed windows to decide")
    ] = 100,
    latency_slo_ms: Annotated[
        float, typer.Option(help="a request slower than this is slow")
    ] = 10000,
    max_runtime: Annotated[
        float, typer.Option(help="seconds before the experiment times out")
    ] = 604800,
    promote_if_noninferior: Annotated[bool, typer.Option("--promote-if-noninferior")] = False,
    reason: ReasonOpt = "",
    json_output: JsonOpt = False,
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
    actor: ActorOpt = None,
) -> None:
    """Start splitting NAME's traffic: --control 3 --candidate 4 (ramped), or --variant 3=50 --variant 4=50."""
    from server.ab import operations
    from server.ab.config import parse_guardrails, parse_ramp, parse_variants

    problems = []
    try:
        variants = parse_variants(variant or [])
    except ValueError as e:
        problems.append(str(e))
        variants = []
    try:
        steps = parse_ramp(ramp) if ramp is not None else None
    except ValueError as e:
        problems.append(str(e))
        steps = None
    config: dict = {
        "primary": primary, "alpha": alpha, "window_seconds": window, "dwell_seconds": dwell,
        "final_dwell_seconds": final_dwell, "min_users_per_arm": min_users,
        "latency_slo_ms": latency_slo_ms, "max_runtime_seconds": max_runtime,
        "promote_if_noninferior": promote_if_noninferior, "auto": auto,
    }  # fmt: skip
    if no_guardrails:
        config["guardrails"] = {}
    elif guardrail:
        try:
            config["guardrails"] = parse_guardrails(guardrail)
        except ValueError as e:
            problems.append(str(e))
    try:
        specs, steps, parsed = operations.build_plan(
            control=control, candidate=candidate, variants=variants, ramp=steps, config=config
        )
    except operations.PlanError as e:
        problems.append(str(e))
    if problems:
        fail("; ".join(problems))
    with opened_registry(home=home, registry=registry, artifacts=artifacts) as reg:
        record = reg.store.experiments.start(
            name, variants=specs, ramp=steps, config=parsed.to_json(),
            actor=actor or default_actor(), reason=reason,
        )  # fmt: skip
    arms = ", ".join(f"{name}@{v.version} ({v.role})" for v in record.variants)
    plan = (
        f"ramp {', '.join(f'{s:g}' for s in record.ramp)} % (candidate share)"
        if record.ramp
        else "weights " + ", ".join(f"{v.weight:g}" for v in record.variants)
    )
    mode = "acts on its decisions (--auto)" if parsed.auto else "recommends; you decide"
    text = f"experiment {record.id} on {name}: {arms}; {plan}; {mode}"
    emit({k: v for k, v in record.to_json().items() if k != "analysis"}, text, as_json=json_output)


@app.command("status")
def status_command(
    name: Annotated[str, typer.Argument(help="adapter name")],
    experiment: Annotated[int | None, typer.Option(help="this experiment id [newest]")] = None,
    plot: Annotated[Path | None, typer.Option(help="write a PNG of the evidence over time")] = None,
    json_output: JsonOpt = False,
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
) -> None:
    """Traffic per variant, the statistics, and the recommendation with its reason."""
    from server.ab import operations

    with opened_registry(home=home, registry=registry, artifacts=artifacts) as reg:
        data = operations.status(reg.store.experiments, name, experiment_id=experiment)
    if plot is not None:
        from server.ab.plot import plot_status

        plot_status(data, plot)
    if json_output:
        emit(data, "", as_json=True)
        return
    _print_status(data)
    if plot is not None:
        typer.echo(f"plot: {plot}")


def _print_status(data: dict) -> None:
    e = data["experiment"]
    step = data["step"]
    where = (
        f"step {step['index'] + 1}/{step['of']} ({step['share_percent']:g} % to the candidate)"
        if step["share_percent"] is not None
        else "static split"
    )
    typer.echo(f"experiment {e['id']} on {e['name']}: {e['status']}, {where}, "
               f"started {e['created_at'][:19]} by {e['created_by']}")  # fmt: skip
    rows = [
        (
            f"{v['model']} ({v['role']})", str(v["users"]), str(v["requests"]),
            _pct(v["error_rate"]), _num(v["mean_latency_s"], "s"), _num(v["mean_ttft_s"], "s"),
            str(v["feedback"]), _num(v["mean_feedback"]),
        )
        for v in data["variants"]
    ]  # fmt: skip
    print_table(
        ("variant", "users", "requests", "errors", "latency", "ttft", "ratings", "mean score"),
        rows,
        empty="no variants",
    )
    rec = data["recommendation"]
    if rec:
        age = data["analysed_seconds_ago"]
        when = f" ({age:.0f} s ago)" if age is not None else ""
        typer.echo(f"decision{when}: {rec['action']}: {rec['reason']}")
        for check in rec.get("checks", []):
            typer.echo(f"  {check}")
    else:
        typer.echo("decision: none yet (no server has analysed it)")
    if e["status"] != "running":
        typer.echo(f"ended {e['ended_at'][:19]} by {e['ended_by']}: {e['end_reason']}")
    for r in data["replicas"]:
        extra = f": {r['reason']}" if r["reason"] else ""
        gone = (
            f" (silent for {r['reported_seconds_ago']:.0f} s: presumed gone)" if r["stale"] else ""
        )
        typer.echo(f"replica {r['replica_id']}: {r['state']}{extra}{gone}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.3f}{unit}"


@app.command("stop")
def stop_command(
    name: Annotated[str, typer.Argument(help="adapter name")],
    promote: Annotated[int | None, typer.Option(help="point production at this variant")] = None,
    rollback: Annotated[
        bool, typer.Option("--rollback", help="point production at the control")
    ] = False,
    reason: ReasonOpt = "",
    json_output: JsonOpt = False,
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
    actor: ActorOpt = None,
) -> None:
    """End NAME's experiment: --promote V, --rollback, or neither (production stays as it is)."""
    from server.ab import operations

    with opened_registry(home=home, registry=registry, artifacts=artifacts) as reg:
        try:
            record, move = operations.stop(
                reg.store.experiments, name, promote=promote, rollback=rollback,
                actor=actor or default_actor(), reason=reason,
            )  # fmt: skip
        except operations.PlanError as e:
            fail(str(e))
    data = {k: v for k, v in record.to_json().items() if k != "analysis"}
    data["alias_event"] = move.to_json() if move else None
    moved = ""
    if move is not None and move.from_version != move.to_version:
        moved = f"; {name}@{move.alias}: {move.from_version or '-'} -> {move.to_version}"
    emit(data, f"experiment {record.id} on {name}: {record.status}{moved}", as_json=json_output)


@app.command("list")
def list_command(
    name: Annotated[str | None, typer.Argument(help="only this adapter")] = None,
    running: Annotated[bool, typer.Option("--running", help="only running ones")] = False,
    json_output: JsonOpt = False,
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
) -> None:
    """Experiments, newest first."""
    with opened_registry(home=home, registry=registry, artifacts=artifacts) as reg:
        records = reg.store.experiments.list(name=name, running_only=running)
    if json_output:
        emit([{k: v for k, v in r.to_json().items() if k != "analysis"} for r in records], "",
             as_json=True)  # fmt: skip
        return
    rows = [
        (str(r.id), r.name, r.status, ", ".join(f"v{v.version}" for v in r.variants),
         r.created_at.strftime("%Y-%m-%d %H:%M:%S"), (r.decision or {}).get("action", "-"))
        for r in records
    ]  # fmt: skip
    print_table(("id", "name", "status", "variants", "started (UTC)", "last decision"), rows,
                empty="no experiments")  # fmt: skip
