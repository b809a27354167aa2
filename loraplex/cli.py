"""The `loraplex` command: mounts each package's CLI. Nothing else lives here."""

from __future__ import annotations

import typer

from loadtest import cli as loadtest_cli
from registry import cli as registry_cli
from server import cli as server_cli
from server.ab import cli as ab_cli
from server.fine_tuning import cli as fine_tuning_cli
from trainer import cli as trainer_cli

app = typer.Typer(
    help="loraplex: serve, version and test many LoRA adapters on one base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("serve")(server_cli.serve)
app.add_typer(server_cli.model_app, name="model")
app.add_typer(registry_cli.app, name="registry")
app.add_typer(ab_cli.app, name="ab")
app.add_typer(trainer_cli.data_app, name="data")
app.command("train")(trainer_cli.train)
app.command("distill")(trainer_cli.distill)
app.command("eval")(trainer_cli.eval_command)
app.command("loadtest")(loadtest_cli.loadtest)
app.command("worker")(fine_tuning_cli.worker)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
