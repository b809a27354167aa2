"""`loraplex train`: validate data, train an adapter, optionally register it.

`train` parses flags and calls trainer.data.validate, then trainer.sft.train_sft (chat data) or,
with `--method dpo`, trainer.dpo.train_dpo (preference data); with either, `--from NAME@V`
continues a registry version instead of a fresh LoRA. With --register, `register_result`: the
one step that puts a finished run into the registry as the next version of a name, with the run's manifest as lineage (other training methods call it
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
    from trainer.dpo import DPOSettings
    from trainer.sft import SFTSettings, StartingAdapter, TrainResult

train_app = typer.Typer(help="Train adapters on chat or preference data.", no_args_is_help=True)
_LORA_DEFAULTS = {"rank": 16, "alpha": 32.0, "dropout": 0.05,
                  "target_modules": "q_proj,k_proj,v_proj,o_proj"}  # fmt: skip


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
    data: Annotated[
        Path, typer.Option("--data", help="training data: chat JSONL (preference JSONL for dpo)")
    ],
    name: Annotated[str, typer.Option("--name", help="adapter name in the registry")],
    val: Annotated[Path | None, typer.Option("--val", help="validation data, as --data")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="run folder [<home>/runs/<name>-<utc stamp>]")
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="base model folder [the prepared one]")
    ] = None,
    method: Annotated[
        str, typer.Option("--method", help="lora, qlora (SFT) or dpo (preference tuning)")
    ] = "lora",
    start: Annotated[
        str | None,
        typer.Option("--from", help="continue this registry version (NAME@V), not a fresh LoRA"),
    ] = None,
    beta: Annotated[float, typer.Option("--beta", help="dpo: strength of the reference")] = 0.1,
    sft_weight: Annotated[
        float,
        typer.Option("--sft-weight", help="dpo: add the chosen answers' SFT loss, this weight"),
    ] = 0.0,
    rank: Annotated[int, typer.Option("--rank")] = 16,
    alpha: Annotated[float, typer.Option("--alpha")] = 32.0,
    dropout: Annotated[float, typer.Option("--dropout")] = 0.05,
    target_modules: Annotated[
        str, typer.Option("--target-modules", help="comma-separated")
    ] = "q_proj,k_proj,v_proj,o_proj",
    lr: Annotated[float | None, typer.Option("--lr", help="[2e-4; dpo 5e-5]")] = None,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine, linear or constant")] = (
        "cosine"
    ),
    epochs: Annotated[float | None, typer.Option("--epochs", help="[3; dpo 1]")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="overrides --epochs")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum")] = 1,
    max_seq_len: Annotated[
        int, typer.Option("--max-seq-len", help="longer examples are dropped")
    ] = 1024,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    packing: Annotated[bool, typer.Option("--packing")] = False,
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing",
            help="recompute activations in backward: less memory, slower steps",
        ),
    ] = False,
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
    events: Annotated[
        Path | None,
        typer.Option("--events", help="append each progress event to this file, a JSON a line"),
    ] = None,
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
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source",
            help="KEY=VALUE: where the run came from (a job, file ids; repeatable), recorded "
            "in the manifest's `source` and so in the version's lineage",
        ),
    ] = None,
    registry: RegistryOpt = None,
    artifacts: ArtifactsOpt = None,
    home: HomeOpt = None,
    actor: ActorOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Train a LoRA adapter on chat data (loss on assistant tokens only), or with --method dpo
    on preference pairs; a fresh one on the base, or --from NAME@V on; print its outputs."""
    from trainer.sft import LoraSettings, SFTSettings, TrainingError, check_method_available

    flags = {"home": home, "registry": registry, "artifacts": artifacts}
    reg_settings = _registry_settings(flags)
    modules = tuple(m.strip() for m in target_modules.split(",") if m.strip())
    dpo = method == "dpo"
    _check_method_flags(dpo=dpo, start=start, beta=beta, sft_weight=sft_weight, packing=packing,
                        early_stopping=early_stopping,
                        lora={"rank": rank, "alpha": alpha, "dropout": dropout,
                              "target_modules": target_modules})  # fmt: skip
    common = {"schedule": schedule, "max_steps": max_steps, "batch_size": batch_size,
              "grad_accum": grad_accum, "max_seq_len": max_seq_len, "seed": seed,
              "eval_every": eval_every, "save_every": save_every, "dtype": dtype,
              "gradient_checkpointing": gradient_checkpointing}  # fmt: skip
    settings: SFTSettings | DPOSettings
    try:
        lora = LoraSettings(rank=rank, alpha=alpha, dropout=dropout, target_modules=modules)
        if dpo:
            settings = _dpo_settings(lora=lora, lr=lr, epochs=epochs, beta=beta,
                                     sft_weight=sft_weight, common=common)  # fmt: skip
        else:
            settings = SFTSettings(
                lora=lora, lr=2e-4 if lr is None else lr, epochs=3.0 if epochs is None else epochs,
                packing=packing, early_stopping_patience=early_stopping, method=method, **common,
            )  # fmt: skip
            check_method_available(method)
    except (ValueError, TrainingError) as e:
        fail(str(e))
    tags = parse_tags(tag or [])
    sources = parse_tags(source or [], flag="--source")
    who = actor or default_actor()
    model_dir = (model or reg_settings.base_model_folder()).expanduser()
    if not (model_dir / "config.json").is_file():
        fail(f"no base model at {model_dir}: run `loraplex model prepare` or pass --model DIR")
    if resume and out is None:
        fail("--resume needs --out: the run folder to continue")
    _check_data(data, val, kind="preference" if dpo else "auto")
    base = _base_model(reg_settings)
    identity = base.canonical(str(model_dir))
    if register:
        _check_registrable(name, identity, flags)
    out_dir = out or reg_settings.data_dir() / "runs" / f"{name}-{_stamp()}"
    starting = None
    if start is not None:
        starting = _fetch_start(start, out_dir, identity, flags)
        settings = _with_start(settings, starting)
    log = _EventLog(events)
    result = _run(model_dir, data, val, out_dir, settings, resume=resume, base=base,
                  start=starting, events=log)  # fmt: skip
    if sources:
        result.manifest["source"] = sources
        result.manifest_path.write_text(json.dumps(result.manifest, indent=2) + "\n")
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
    log.write(_done_event(result, version))
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
    """A chat example's last user message, or a preference pair's (from its prompt)."""
    messages = getattr(example, "messages", None) or getattr(example, "prompt", ())
    users = [m.content for m in messages if m.role == "user"]
    return users[-1] if users else None


def _check_method_flags(
    *, dpo: bool, start: str | None, beta: float, sft_weight: float, packing: bool,
    early_stopping: int | None, lora: Mapping[str, Any],
) -> None:  # fmt: skip
    """Flags that belong to one method only, and LoRA shape flags beside --from (which takes
    the version's own shape): a clear error instead of a silently ignored flag."""
    if not dpo:
        if beta != 0.1:
            fail("--beta applies to --method dpo only")
        if sft_weight:
            fail("--sft-weight applies to --method dpo only")
    elif packing or early_stopping is not None:
        fail("--packing and --early-stopping apply to SFT (--method lora or qlora) only")
    changed = [f"--{key.replace('_', '-')}" for key, value in lora.items()
               if value != _LORA_DEFAULTS[key]]  # fmt: skip
    if start is not None and changed:
        fail(
            f"{', '.join(changed)} shape a fresh adapter; --from {start} continues that "
            "version's own adapter"
        )


def _dpo_settings(
    *, lora: Any, lr: float | None, epochs: float | None, beta: float, sft_weight: float,
    common: Mapping[str, Any],
) -> DPOSettings:  # fmt: skip
    from trainer.dpo import DPOSettings

    defaults = DPOSettings.__dataclass_fields__
    return DPOSettings(
        lora=lora, beta=beta, sft_weight=sft_weight,
        lr=defaults["lr"].default if lr is None else lr,
        epochs=defaults["epochs"].default if epochs is None else epochs, **common,
    )  # fmt: skip


def _fetch_start(
    ref: str, out_dir: Path, identity: str, flags: Mapping[str, Any]
) -> StartingAdapter:
    """The version --from names, fetched into the run folder; on another base model: exit 2."""
    from trainer.sft import fetch_starting_adapter

    with opened_registry(**flags) as reg:
        starting = fetch_starting_adapter(reg, ref, out_dir)
        declared = reg.store.resolve(starting.ref).base_model
        if not reg.base.same(declared, identity):
            fail(f"--from {ref}: {starting.ref} is an adapter of {declared!r}, not of "
                 f"{identity!r}; nothing trained")  # fmt: skip
    return starting


def _with_start(settings: Any, starting: StartingAdapter) -> SFTSettings | DPOSettings:
    """The settings of a run continuing `starting`: its own LoRA shape, its resolved ref."""
    from dataclasses import replace

    try:
        return replace(settings, lora=starting.lora, start=starting.ref)
    except ValueError as e:
        fail(str(e))


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


def _check_data(data: Path, val: Path | None, *, kind: str = "auto") -> None:
    """Every problem of both files (and of their overlap) on stderr, then exit 2. Lengths are
    the trainer's: examples over --max-seq-len are dropped and counted, not refused."""
    from trainer.data import validate

    reports = [validate(data, val=val, kind=kind)] + (
        [validate(val, kind=kind)] if val is not None else []
    )
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
    model_dir: Path, data: Path, val: Path | None, out_dir: Path,
    settings: SFTSettings | DPOSettings, *, resume: bool, base: BaseModel,
    start: StartingAdapter | None = None, events: _EventLog | None = None,
) -> TrainResult:  # fmt: skip
    """train_sft (or train_dpo) with a progress bar (step, loss) on stderr and each event in
    `events`; TrainingError -> exit 2."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from trainer.sft import TrainingError, train_sft

    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}  val {task.fields[val]}"))  # fmt: skip
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("train", total=None, loss="-", val="-")

        def update(event: dict[str, Any]) -> None:
            if events is not None:
                events.write(event)
            fields: dict[str, Any] = {"completed": event["step"], "total": event["max_steps"]}
            if event["event"] == "train":
                fields["loss"] = f"{event['loss']:.4f}"
            elif event["event"] == "eval":
                fields["val"] = f"{event['eval_loss']:.4f}"
            bar.update(task, **fields)

        try:
            if settings.method == "dpo":
                from trainer.dpo import train_dpo

                return train_dpo(
                    model_dir=model_dir, train=data, val=val, out_dir=out_dir,
                    settings=settings, start=start, resume=resume, progress=update, base=base,
                )  # fmt: skip
            return train_sft(
                model_dir=model_dir, train=data, val=val, out_dir=out_dir, settings=settings,
                resume=resume, progress=update, base=base, start=start,
            )  # fmt: skip
        except TrainingError as e:
            fail(str(e))


class _EventLog:
    """--events: each event appended to the file as one JSON line and flushed at once, so that
    a reader tailing it sees every step as it ends. Nothing is written without a path."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            except OSError as e:
                fail(f"--events {path}: cannot write there ({e.strerror or e}); nothing trained")

    def write(self, event: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        stamped = dict(event) | {"time": datetime.now(UTC).isoformat(timespec="milliseconds")}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(stamped) + "\n")
            handle.flush()


def _done_event(result: TrainResult, version: VersionRecord | None) -> dict[str, Any]:
    """The last event of a run, once its outputs are written (and registered with --register)."""
    manifest = result.manifest
    gate = manifest.get("serving_gate")
    return {"event": "done", "step": manifest["steps"], "max_steps": manifest["steps"],
            "adapter_dir": str(result.adapter_dir.resolve()),
            "manifest": str(result.manifest_path.resolve()),
            "best_val_loss": result.best_val_loss, "final_val_loss": result.final_val_loss,
            "early_stopped": manifest["early_stopped"],
            "serving_gate_passed": gate["passed"] if gate else None,
            "version": version.ref if version else None}  # fmt: skip


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
    if manifest.get("method") == "dpo":
        from trainer.dpo import reward_trend

        trend = reward_trend(json.loads(result.metrics_path.read_text(encoding="utf-8")))
        data["rewards"] = trend
        if trend["last_margin"] is not None:
            lines.append(f"reward margin {trend['first_margin']:.3f} -> {trend['last_margin']:.3f}, "
                         f"accuracy {trend['first_accuracy']:.2f} -> {trend['last_accuracy']:.2f}")  # fmt: skip
    if version is not None:
        lines.append(version.ref)
    emit(data, "\n".join(lines), as_json=as_json)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
