"""`loraplex distill`: parse flags, read the API key from the environment, run with a progress bar.

Exit codes: 0 when every prompt got an answer or was filtered, 1 when some failed after retries,
2 for bad input (every problem of the prompts file with its line number, on one `error:` line),
130 when interrupted (the output stays valid: run the same command again to continue).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:  # the library (and httpx) is imported when the command runs: --help stays quick
    from trainer.distill import DistillProgress, DistillReport, DistillSettings

EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEFAULT_KEY_ENV = "OPENAI_API_KEY"


def fail(message: str, *, code: int = EXIT_USER_ERROR) -> NoReturn:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


def distill(
    teacher_url: Annotated[
        str, typer.Option("--teacher-url", help="Teacher server root (/v1 optional).")
    ],
    teacher_model: Annotated[str, typer.Option("--teacher-model", help="`model` to ask.")],
    prompts: Annotated[
        Path,
        typer.Option("--prompts", help='JSONL {"prompt": ...} | {"messages": [...]}, or .txt.'),
    ],
    out: Annotated[Path, typer.Option("--out", help="JSONL chat examples (appended; resumable).")],
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    max_tokens: Annotated[int, typer.Option(help="Answer length limit, tokens.")] = 512,
    system: Annotated[
        str | None, typer.Option(help="System prompt for prompts that carry none.")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at most.")] = 4,
    retries: Annotated[int, typer.Option(help="Retries on timeouts, connections, 429, 5xx.")] = 4,
    timeout: Annotated[float, typer.Option(help="Per-request timeout, seconds.")] = 120.0,
    backoff: Annotated[float, typer.Option(help="First retry delay, seconds (doubles).")] = 1.0,
    api_key_env: Annotated[
        str | None,
        typer.Option(help=f"Variable holding the teacher's API key [{DEFAULT_KEY_ENV} if set]."),
    ] = None,
    keep_truncated: Annotated[
        bool, typer.Option(help="Keep answers cut at --max-tokens (finish_reason length).")
    ] = False,
    min_chars: Annotated[int, typer.Option(help="Drop answers shorter than this.")] = 1,
    max_chars: Annotated[int | None, typer.Option(help="Drop answers longer than this.")] = None,
    refusal_pattern: Annotated[
        list[str] | None, typer.Option(help="Drop answers matching REGEX; repeatable.")
    ] = None,
    drop_refusals: Annotated[
        bool, typer.Option(help="Drop answers matching common refusal phrases.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Ask a teacher model every prompt; write OpenAI chat fine-tuning examples (resumable)."""
    from trainer.distill import DistillSettings

    key_env = api_key_env or (DEFAULT_KEY_ENV if os.environ.get(DEFAULT_KEY_ENV) else None)
    api_key = os.environ.get(key_env) if key_env else None
    if api_key_env and not api_key:
        fail(f"--api-key-env: the variable {api_key_env} is not set")
    try:
        settings = DistillSettings(
            teacher_url=teacher_url, teacher_model=teacher_model, prompts=prompts, out=out,
            temperature=temperature, max_tokens=max_tokens, system=system,
            concurrency=concurrency, retries=retries, timeout=timeout, backoff=backoff,
            api_key_env=key_env, api_key=api_key, keep_truncated=keep_truncated,
            min_chars=min_chars, max_chars=max_chars,
            refusal_patterns=tuple(refusal_pattern or ()), drop_refusals=drop_refusals,
        )  # fmt: skip
    except ValueError as e:
        fail(str(e))
    report = _run_with_progress(settings)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        typer.echo(summary_line(report))
    if report.exit_code:
        raise typer.Exit(EXIT_FAILED)


def _run_with_progress(settings: DistillSettings) -> DistillReport:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from trainer.distill import DistillInputError, run_distill

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("distill"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("written {task.fields[written]}  failed {task.fields[failed]}"),
        TextColumn("filtered {task.fields[filtered]}"),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = bar.add_task("distill", total=None, written=0, failed=0, filtered=0)

    def show(p: DistillProgress) -> None:
        bar.update(
            task, total=p.total, completed=p.done, written=p.written, failed=p.failed,
            filtered=p.filtered,
        )  # fmt: skip

    try:
        with bar:
            return run_distill(settings, progress=show)
    except DistillInputError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write {settings.out}: {e}")
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted: every line of {settings.out} is complete; "
            "run the same command again to continue",
            err=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None


def summary_line(report: DistillReport) -> str:
    """One line: what was asked, written, failed and filtered, and where it went."""

    def by_reason(counts: dict[str, int]) -> str:
        return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))

    parts = [
        f"{report.written} written of {report.asked} asked",
        f"{report.resumed} already answered",
        f"{report.duplicates} duplicate prompts",
        f"{report.failed_total} failed"
        + (f" ({by_reason(report.failed)})" if report.failed else ""),
        f"{report.filtered_total} filtered"
        + (f" ({by_reason(report.filtered)})" if report.filtered else ""),
    ]
    return "; ".join(parts) + f" -> {report.out}"
