"""`loraplex data ...`: validate a training file, split it into train and validation files.

Commands parse flags and call one function of trainer.data. `validate` prints every problem as
`FILE:LINE: message`, then a summary, and exits 1 when there are problems; an expected failure
(a model folder that cannot be used, a bad fraction) prints one line `error: ...` on stderr and
exits 2. `--json` prints one JSON document on stdout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError

from trainer.data import DatasetError, Problem, Report, split, validate

EXIT_PROBLEMS = 1
EXIT_USER_ERROR = 2

data_app = typer.Typer(
    help="Training data: validate chat and preference JSONL, split it for training.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def fail(message: str, *, code: int = EXIT_USER_ERROR) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def default_model_folder() -> tuple[Path | None, str | None]:
    """The prepared base model's folder when it exists; else None and why the length check is
    skipped."""
    from registry.settings import RegistrySettings

    try:
        folder = RegistrySettings().base_model_folder()
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in e.errors())
        fail(f"invalid setting: {problems}")
    if folder.is_dir():
        return folder, None
    return None, (
        f"length check skipped: no --model, and no prepared base model at {folder} "
        "(run `loraplex model prepare`, or pass --model DIR)"
    )


def problem_line(file: Path, problem: Problem) -> str:
    return (
        f"{file}:{problem.line}: {problem.message}"
        if problem.line is not None
        else f"{file}: {problem}"
    )


@data_app.command("validate")
def validate_command(
    file: Annotated[Path, typer.Argument(help="training data, JSONL")],
    model: Annotated[
        Path | None,
        typer.Option("--model", help="model folder whose tokenizer counts tokens [prepared base]"),
    ] = None,
    max_seq_len: Annotated[
        int, typer.Option("--max-seq-len", min=1, help="longest example, in tokens")
    ] = 2048,
    val: Annotated[
        Path | None, typer.Option("--val", help="validation file that must not overlap")
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Every problem of FILE at once (with line numbers), then a summary; exit 1 on problems."""
    skipped: str | None = None
    if model is None:
        model, skipped = default_model_folder()
    try:
        if model is None:
            report = validate(file, tokenizer_dir=None, max_seq_len=max_seq_len, val=val)
        else:
            from rich.console import Console

            # Loading transformers and tokenizing takes seconds; silent when not on a terminal.
            with Console(stderr=True).status(f"Counting tokens of {file}..."):
                report = validate(file, tokenizer_dir=model, max_seq_len=max_seq_len, val=val)
    except ValueError as e:
        fail(" ".join(str(e).split()))
    if skipped:
        report.summary["length_check"] = skipped
    if json_output:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        for problem in report.problems:
            typer.echo(problem_line(file, problem))
        typer.echo(describe_summary(file, report))
    if not report.ok:
        raise typer.Exit(EXIT_PROBLEMS)


def describe_summary(file: Path, report: Report) -> str:
    s: dict[str, Any] = report.summary
    lines = [f"{file}: {s['examples']} {s['kind']} example(s), {s['problems']} problem(s)"]
    if s["tokens"] is not None:
        t = s["tokens"]
        lines.append(
            f"tokens: {s['tokens_total']} total; p50 {t['p50']}, p90 {t['p90']}, "
            f"p99 {t['p99']}, max {t['max']} (tokenizer {s['tokenizer']}, "
            f"--max-seq-len {s['max_seq_len']})"
        )
    else:
        lines.append(s["length_check"])
    lines.append(
        f"turns per example: mean {s['turns']['mean']:g}, max {s['turns']['max']}; "
        f"with a system message: {s['system_share']:.0%}"
    )
    return "\n".join(lines)


@data_app.command("split")
def split_command(
    file: Annotated[Path, typer.Argument(help="training data, JSONL")],
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="share of examples for validation")
    ] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="same seed, same split")] = 0,
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", help="where to write [next to FILE]")
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Write FILE's NAME.train.jsonl and NAME.val.jsonl; duplicates stay on one side."""
    try:
        train_path, val_path = split(file, val_fraction=val_fraction, seed=seed, out_dir=out_dir)
    except DatasetError as e:
        for problem in e.problems:
            typer.echo(problem_line(file, problem), err=True)
        fail(f"{file} has {len(e.problems)} problem(s); nothing written", code=EXIT_PROBLEMS)
    except ValueError as e:
        fail(" ".join(str(e).split()))
    counts = {path: count_rows(path) for path in (train_path, val_path)}
    data = {
        "train": {"path": str(train_path), "examples": counts[train_path]},
        "val": {"path": str(val_path), "examples": counts[val_path]},
        "val_fraction": val_fraction,
        "seed": seed,
    }
    text = "\n".join(f"{path}  {counts[path]} example(s)" for path in (train_path, val_path))
    typer.echo(json.dumps(data, indent=2) if json_output else text)


def count_rows(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").split("\n") if line.strip())
