"""`loraplex train`: validate chat data, train an adapter (trainer.sft), optionally register it.

`train` parses flags and calls trainer.data.validate, trainer.sft.train_sft and, with
--register, `register_result`: the one step that puts a finished run into the registry as the
next version of a name, with the run's manifest as lineage (other training methods call it
too). Every expected failure prints one line `error: ...` on stderr and exits 2 (bad data or
flags, a rejected adapter: then nothing is registered) or 1 (the registry is unreachable).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from registry.cli import (
    ActorOpt,
    ArtifactsOpt,
    HomeOpt,
    JsonOpt,
    RegistryOpt,
    default_actor,
    emit,
    fail,
    opened_registry,
    parse_tags,
)

if TYPE_CHECKING:
    from registry.base_model import BaseModel
    from registry.records import VersionRecord
    from registry.service import Registry
    from registry.settings import RegistrySettings
    from trainer.sft import SFTSettings, TrainResult

train_app = typer.Typer(help="Train adapters on chat data.", no_args_is_help=True)


def register_result(
    result: TrainResult,
    name: str,
    *,
    registry: Registry,
    actor: str,
    tags: Mapping[str, str] | None = None,
) -> VersionRecord:
    """Register a finished run's adapter as `name`'s next version with its manifest as lineage.

    The registry validates it (shapes, rank, base model of the name's earlier versions) and
    raises AdapterRejectedError with every problem; then nothing was registered.
    """
    return registry.register(
        name, result.adapter_dir, actor=actor, tags=dict(tags or {}), lineage=result.manifest
    )


def train(
    data: Annotated[Path, typer.Option("--data", help="training data: chat JSONL")],
    name: Annotated[str, typer.Option("--name", help="adapter name in the registry")],
    val: Annotated[Path | None, typer.Option("--val", help="validation data: chat JSONL")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="run folder [<home>/runs/<name>-<utc stamp>]")
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="base model folder [the prepared one]")
    ] = None,
    method: Annotated[str, typer.Option("--method", help="lora or qlora")] = "lora",
    rank: Annotated[int, typer.Option("--rank")] = 16,
    alpha: Annotated[float, typer.Option("--alpha")] = 32.0,
    dropout: Annotated[float, typer.Option("--dropout")] = 0.05,
    target_modules: Annotated[
        str, typer.Option("--target-modules", help="comma-separated")
    ] = "q_proj,k_proj,v_proj,o_proj",
    lr: Annotated[float, typer.Option("--lr")] = 2e-4,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine, linear or constant")] = (
        "cosine"
    ),
    epochs: Annotated[float, typer.Option("--epochs")] = 3.0,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="overrides --epochs")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum")] = 1,
    max_seq_len: Annotated[
        int, typer.Option("--max-seq-len", help="longer examples are dropped")
    ] = 1024,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    packing: Annotated[bool, typer.Option("--packing")] = False,
    eval_every: Annotated[
        int | None, typer.Option("--eval-every", help="steps [once per epoch]")
    ] = None,
    early_stopping: Annotated[
        int | None, typer.Option("--early-stopping", help="evaluations without improvement")
    ] = None,
    save_every: Annotated[
        int | None, typer.Option("--save-every", help="steps [at every evaluation]")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto, bfloat16 or float32")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out")] = False,
    register: Annotated[bool, typer.Option("--register", help="register the adapter")] = False,
    gate: Annotated[
        bool | None,
        typer.Option(
            "--gate/--no-gate", help="serve it on the real engine and check it [on with --register]"
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="register even if the serving gate fails (recorded)")
    ] = False,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="KEY=VALUE (repeatable)")] = None,
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
    actor: ActorOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Train a LoRA adapter on chat data (loss on assistant tokens only); print its outputs."""
    from trainer.sft import LoraSettings, SFTSettings, TrainingError, check_method_available

    flags = {"home": home, "registry": registry, "artifacts": artifacts}
    reg_settings = _registry_settings(flags)
    modules = tuple(m.strip() for m in target_modules.split(",") if m.strip())
    try:
        lora = LoraSettings(rank=rank, alpha=alpha, dropout=dropout, target_modules=modules)
        settings = SFTSettings(
            lora=lora, lr=lr, schedule=schedule, epochs=epochs, max_steps=max_steps,
            batch_size=batch_size, grad_accum=grad_accum, max_seq_len=max_seq_len, seed=seed,
            packing=packing, eval_every=eval_every, early_stopping_patience=early_stopping,
            save_every=save_every, method=method, dtype=dtype,
        )  # fmt: skip
        check_method_available(method)
    except (ValueError, TrainingError) as e:
        fail(str(e))
    tags = parse_tags(tag or [])
    who = actor or default_actor()
    model_dir = (model or reg_settings.base_model_folder()).expanduser()
    if not (model_dir / "config.json").is_file():
        fail(f"no base model at {model_dir}: run `loraplex model prepare` or pass --model DIR")
    if resume and out is None:
        fail("--resume needs --out: the run folder to continue")
    _check_data(data, val)
    base = _base_model(reg_settings)
    if register:
        _check_registrable(name, base.canonical(str(model_dir)), flags)
    out_dir = out or reg_settings.data_dir() / "runs" / f"{name}-{_stamp()}"
    result = _run(model_dir, data, val, out_dir, settings, resume=resume, base=base)
    if gate if gate is not None else register:
        verdict = _serving_gate(result, model_dir, data=data, val=val, settings=settings,
                                forced=force)  # fmt: skip
        if register and not verdict["passed"] and not force:
            fail(
                "the adapter fails the serving gate, so it was not registered (--force to "
                "register anyway; recorded in its lineage): " + "; ".join(verdict["problems"])
            )
    version = None
    if register:
        with opened_registry(**flags) as reg:
            version = register_result(result, name, registry=reg, actor=who, tags=tags)
    _print_result(result, version, as_json=json_output)


train_app.command("train")(train)


def _serving_gate(
    result: TrainResult, model_dir: Path, *, data: Path, val: Path | None,
    settings: Any, forced: bool,
) -> dict[str, Any]:  # fmt: skip
    """Run the train/serve agreement gate (trainer.gate) on held-out prompts and record the
    verdict in the run's manifest (the lineage a registration stores)."""
    from rich.console import Console

    from trainer.data import read_dataset
    from trainer.gate import GateError, run_gate

    source = val or data
    prompts = [
        last_user
        for example in read_dataset(source).examples
        if (last_user := _last_user_message(example)) is not None
    ][:_GATE_PROMPTS]
    with Console(stderr=True).status("Serving the adapter on the engine to check it..."):
        try:
            verdict = run_gate(
                model_dir=model_dir, adapter_dir=result.adapter_dir, prompts=prompts,
                dtype=settings.dtype, max_lora_rank=max(16, settings.lora.rank),
            ).to_json()  # fmt: skip
        except GateError as e:
            verdict = {"passed": False, "accepted": False, "problems": [str(e)]}
    verdict.update(forced=forced and not verdict["passed"], held_out=val is not None,
                   prompts_from=str(source))  # fmt: skip
    result.manifest["serving_gate"] = verdict
    result.manifest_path.write_text(json.dumps(result.manifest, indent=2) + "\n")
    return verdict


_GATE_PROMPTS = 6


def _last_user_message(example: Any) -> str | None:
    users = [m.content for m in getattr(example, "messages", ()) if m.role == "user"]
    return users[-1] if users else None


def _registry_settings(flags: Mapping[str, Any]) -> RegistrySettings:
    from registry.settings import RegistrySettings

    try:
        return RegistrySettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in e.errors())
        fail(f"invalid setting: {problems}")


def _base_model(settings: RegistrySettings) -> BaseModel:
    """The base model as the registry these settings open names it."""
    from registry.base_model import load_base_model

    return load_base_model(
        settings.base_model, settings.base_model_folder(), embedded=settings.base_model_dir is None
    )


def _check_data(data: Path, val: Path | None) -> None:
    """Every problem of both files (and of their overlap) on stderr, then exit 2. Lengths are
    the trainer's: examples over --max-seq-len are dropped and counted, not refused."""
    from trainer.data import validate

    reports = [validate(data, val=val)] + ([validate(val)] if val is not None else [])
    problems = [(r.dataset.path, p) for r in reports for p in r.problems]
    for path, problem in problems:
        where = f"{path}:{problem.line}" if problem.line is not None else str(path)
        typer.echo(f"error: {where}: {problem.message}", err=True)
    if problems:
        fail(f"{len(problems)} problem(s) in the data; nothing was trained")


def _check_registrable(name: str, identity: str, flags: Mapping[str, Any]) -> None:
    """Before training: the name is valid and its earlier versions use this base model."""
    from registry.errors import RegistryUserError
    from registry.refs import check_name
    from registry.store import base_mismatch

    try:
        check_name(name)
    except RegistryUserError as e:
        fail(str(e))
    with opened_registry(**flags) as reg:
        expected = reg.store.find_base_model(name)
        if expected is not None and not reg.base.same(expected, identity):
            fail(base_mismatch(name, declared=identity, expected=expected) + "; nothing trained")


def _run(
    model_dir: Path, data: Path, val: Path | None, out_dir: Path, settings: SFTSettings,
    *, resume: bool, base: BaseModel,
) -> TrainResult:  # fmt: skip
    """train_sft with a progress bar (step, loss) on stderr; TrainingError -> exit 2."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from trainer.sft import TrainingError, train_sft

    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}  val {task.fields[val]}"))  # fmt: skip
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("train", total=None, loss="-", val="-")

        def update(event: dict[str, Any]) -> None:
            fields: dict[str, Any] = {"completed": event["step"], "total": event["max_steps"]}
            if event["event"] == "train":
                fields["loss"] = f"{event['loss']:.4f}"
            elif event["event"] == "eval":
                fields["val"] = f"{event['eval_loss']:.4f}"
            bar.update(task, **fields)

        try:
            return train_sft(
                model_dir=model_dir, train=data, val=val, out_dir=out_dir, settings=settings,
                resume=resume, progress=update, base=base,
            )  # fmt: skip
        except TrainingError as e:
            fail(str(e))


def _print_result(result: TrainResult, version: VersionRecord | None, *, as_json: bool) -> None:
    manifest = result.manifest
    data = {
        "adapter_dir": str(result.adapter_dir), "metrics": str(result.metrics_path),
        "plot": str(result.plot_path), "manifest": str(result.manifest_path),
        "best_val_loss": result.best_val_loss, "final_val_loss": result.final_val_loss,
        "steps": manifest["steps"], "version": version.to_json() if version else None,
    }  # fmt: skip
    losses = ", ".join(
        f"{label} {value:.4f}"
        for label, value in (("best val loss", result.best_val_loss),
                             ("final val loss", result.final_val_loss))
        if value is not None
    )  # fmt: skip
    lines = [f"adapter   {result.adapter_dir}", f"metrics   {result.metrics_path}",
             f"plot      {result.plot_path}", f"manifest  {result.manifest_path}",
             f"{manifest['steps']} steps" + (f"; {losses}" if losses else "")]  # fmt: skip
    if version is not None:
        lines.append(version.ref)
    emit(data, "\n".join(lines), as_json=as_json)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
