"""`loraplex eval NAME@V --data FILE [--baseline base|NAME@V]`: evaluate a registry version
through the serving path (trainer.evaluate), print a side-by-side report, write a PNG summary
and store the result on the version (registry.evaluations) unless --no-store.

Every expected failure prints one line `error: ...` on stderr and exits 2 (bad data, flags or
references) or 1 (the registry or the serving path failed). `--json` prints one JSON document.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from registry.cli import (
    EXIT_SERVICE_ERROR,
    ActorOpt,
    ArtifactsOpt,
    HomeOpt,
    JsonOpt,
    RegistryOpt,
    default_actor,
    emit,
    fail,
    opened_registry,
)

if TYPE_CHECKING:
    from registry.settings import RegistrySettings

eval_app = typer.Typer(help="Evaluate adapter versions against a baseline.", no_args_is_help=True)
PLOTTED = ("exact_match", "contains", "token_f1", "rouge_l", "forgetting_pass_rate")


def eval_command(
    ref: Annotated[str, typer.Argument(help="the version: NAME@VERSION (or NAME@ALIAS)")],
    data: Annotated[Path, typer.Option("--data", help="held-out chat JSONL")],
    baseline: Annotated[
        str, typer.Option("--baseline", help="'base' (the base model) or NAME@VERSION")
    ] = "base",
    model: Annotated[
        Path | None, typer.Option("--model", help="base model folder [the prepared one]")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 128,
    samples: Annotated[int, typer.Option("--samples", min=0, help="rows of the sample table")] = 5,
    plot: Annotated[Path | None, typer.Option("--plot", help="write a PNG summary here")] = None,
    forgetting: Annotated[
        bool, typer.Option("--forgetting/--no-forgetting", help="run the shipped forgetting set")
    ] = True,
    case_sensitive: Annotated[
        bool, typer.Option("--case-sensitive", help="do not lower-case answers for the metrics")
    ] = False,
    store: Annotated[
        bool, typer.Option("--store/--no-store", help="store the result on the version")
    ] = True,
    dtype: Annotated[str, typer.Option("--dtype", help="auto, bfloat16 or float32")] = "auto",
    json_output: JsonOpt = False,
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
    actor: ActorOpt = None,
) -> None:
    """Loss, perplexity, generation metrics and forgetting of a version vs a baseline."""
    from trainer.evaluate import EvalConfig

    flags = {"home": home, "registry": registry, "artifacts": artifacts}
    settings = _settings(flags)
    model_dir = (model or settings.base_model_folder()).expanduser()
    if not (model_dir / "config.json").is_file():
        fail(f"no base model at {model_dir}: run `loraplex model prepare` or pass --model DIR")
    config = EvalConfig(
        max_tokens=max_tokens, samples=samples, forgetting=forgetting,
        case_sensitive=case_sensitive, dtype=dtype,
    )  # fmt: skip
    document = _run(settings, ref, data=data, baseline=baseline, model_dir=model_dir, config=config)
    stored = None
    if store:
        name, _, number = document["version"].partition("@")
        with opened_registry(**flags) as reg:
            stored = reg.store.evaluations.add(
                name, int(number), baseline=document["baseline"],
                dataset_sha256=document["dataset"]["sha256"], metrics=document,
                actor=actor or default_actor(),
            )  # fmt: skip
    if plot is not None:
        write_plot(document, plot)
    result = {**document, "stored": stored.id if stored else None, "plot": _text(plot)}
    if json_output:
        emit(result, "", as_json=True)
        return
    print_report(document)
    if plot is not None:
        typer.echo(f"plot: {plot}")
    if stored is not None:
        typer.echo(f"stored evaluation {stored.id} on {stored.ref}")


eval_app.command("eval")(eval_command)


@eval_app.callback()
def _group() -> None:
    """Evaluate adapter versions against a baseline (`eval` stays a subcommand)."""


def _settings(flags: Mapping[str, Any]) -> RegistrySettings:
    from pydantic import ValidationError

    from registry.settings import RegistrySettings

    try:
        return RegistrySettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in e.errors())
        fail(f"invalid setting: {problems}")


def _run(settings: RegistrySettings, ref: str, **kwargs: Any) -> dict[str, Any]:
    """run_evaluation with a spinner on stderr; expected failures -> one line and an exit."""
    from rich.console import Console

    from registry.errors import RegistryError, RegistryUserError
    from trainer.data import DatasetError
    from trainer.evaluate import EvaluationError, ServingPathError, run_evaluation

    try:
        with Console(stderr=True).status(f"Evaluating {ref}...") as status:
            return run_evaluation(settings, ref, progress=status.update, **kwargs)
    except DatasetError as e:
        for problem in e.problems:
            where = f"{e.path}:{problem.line}" if problem.line is not None else str(e.path)
            typer.echo(f"error: {where}: {problem.message}", err=True)
        fail(f"{len(e.problems)} problem(s) in {e.path}; nothing was evaluated")
    except ServingPathError as e:
        fail(" ".join(str(e).split()), code=EXIT_SERVICE_ERROR)
    except EvaluationError as e:
        fail(" ".join(str(e).split()))
    except RegistryError as e:
        code = 2 if isinstance(e, RegistryUserError) else EXIT_SERVICE_ERROR
        fail(" ".join(str(e).split()), code=code)


def print_report(document: Mapping[str, Any]) -> None:
    """The metrics of both sides with deltas, the forgetting result and the sample table."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=False)
    version, baseline = document["version"], document["baseline"]
    metrics = document["metrics"]
    table = Table("metric", version, baseline, "delta", title=f"{version} vs {baseline}")
    for name, value in metrics["version"].items():
        other = metrics["baseline"].get(name)
        delta = document["deltas"].get(name)
        table.add_row(name, _number(value), _number(other), _number(delta, signed=True))
    console.print(table)
    forgetting = document.get("forgetting")
    if forgetting:
        console.print(
            f"forgetting: {forgetting['forgetting']:+.3f} (pass rate "
            f"{forgetting['version_pass_rate']:.3f} vs {forgetting['baseline_pass_rate']:.3f} on "
            f"{forgetting['items']} items)"
        )
        for row in forgetting["lost"]:
            console.print(f"  lost: {row['prompt']} -> {row['version'][:80]!r}", markup=False)
    if document["samples"]:
        sample_table = Table("prompt", "reference", version, baseline, show_lines=True)
        for row in document["samples"]:
            sample_table.add_row(row["prompt"], row["reference"], row["version"], row["baseline"])
        console.print(sample_table)


def write_plot(document: Mapping[str, Any], path: Path) -> Path:
    """Bars of each metric for both sides (scores on the left, loss on the right), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = document["metrics"]
    names = [n for n in PLOTTED if metrics["version"].get(n) is not None]
    fig, (scores, losses) = plt.subplots(
        1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]}
    )
    width = 0.38
    for offset, key in ((-width / 2, "version"), (width / 2, "baseline")):
        label = document[key]
        xs = [i + offset for i in range(len(names))]
        scores.bar(xs, [metrics[key][n] for n in names], width, label=label)
        loss = metrics[key].get("loss")
        losses.bar([offset], [loss if loss is not None else 0.0], width, label=label)
    scores.set_xticks(range(len(names)), [n.replace("_", " ") for n in names])
    scores.set_ylim(0, 1.05)
    scores.set_ylabel("score (higher is better)")
    scores.legend()
    losses.set_xticks([0], ["validation loss"])
    losses.set_ylabel("loss per assistant token (lower is better)")
    fig.suptitle(f"{document['version']} vs {document['baseline']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _number(value: Any, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _text(path: Path | None) -> str | None:
    return str(path) if path is not None else None
