"""`loraplex worker`: claim queued fine-tuning jobs from the registry database and train them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from registry.cli import ArtifactsOpt, HomeOpt, RegistryOpt, fail


def worker(
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="base model folder [the prepared one]")
    ] = None,
    gate: Annotated[
        bool | None,
        typer.Option("--gate/--no-gate", help="adapters must pass the serving gate [on]"),
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="run at most one job, then exit")] = False,
) -> None:
    """Claim queued fine-tuning jobs (oldest first) and run each with `loraplex train`, until
    interrupted; several workers can drain one queue (PostgreSQL row locks)."""
    from registry.service import Registry
    from server.fine_tuning.settings import FineTuningSettings
    from server.fine_tuning.worker import worker_for

    flags = {"registry": registry, "artifacts": artifacts, "home": home, "base_model_dir": model,
             "fine_tuning_gate": gate}  # fmt: skip
    settings = FineTuningSettings(**{k: v for k, v in flags.items() if v is not None})
    folder = settings.base_model_folder()
    if not (folder / "config.json").is_file():
        fail(f"no base model at {folder}: run `loraplex model prepare` or pass --model DIR")
    with Registry.open(settings) as opened:
        runner = worker_for(opened, settings, model_dir=folder)
        typer.echo(f"fine-tuning worker {runner.name} on {settings.database_url()}", err=True)
        if once:
            runner.run_once()
            return
        try:
            runner.run_forever()
        except KeyboardInterrupt:
            pass
