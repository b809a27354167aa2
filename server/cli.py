"""`loraplex serve` and `loraplex model prepare`: parse flags, build settings, call the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from server.console_logging import configure_serve_logging
from server.settings import ServeSettings
from server.spawned import exit_fast_and_quietly, prepare_spawned_engine_process

# First thing in every engine process vLLM spawns from `loraplex serve` (see server.spawned).
prepare_spawned_engine_process()

console = Console(stderr=True, soft_wrap=True)
model_app = typer.Typer(help="The base model: prepare the embedded default.", no_args_is_help=True)


def _prepare_model(home: Path) -> Path:
    from server.embedded_model import (
        ModelPrepareError,
        embedded_model_dir,
        is_prepared,
        prepare_embedded_model,
    )

    folder = embedded_model_dir(home)
    if is_prepared(folder):
        return folder
    try:
        with console.status("Preparing the embedded model (SmolLM2-135M-Instruct)...") as status:
            return prepare_embedded_model(home, progress=lambda m: status.update(m))
    except ModelPrepareError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from e


@model_app.command("prepare")
def prepare(
    home: Annotated[Path | None, typer.Option(help="data dir [env LORAPLEX_HOME]")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Fetch and convert the embedded default model once; print its folder."""
    settings = ServeSettings(**({"home": home} if home else {}))
    folder = _prepare_model(settings.data_dir())
    if json_output:
        import json

        print(json.dumps({"model": str(folder)}))
    else:
        print(folder)


def serve(
    model: Annotated[
        Path | None, typer.Option(help="local HF model folder (default: embedded)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="bind address [127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port [8000]")] = None,
    adapter: Annotated[
        list[str] | None, typer.Option(help="NAME=PATH local LoRA folder (repeatable)")
    ] = None,
    served_name: Annotated[
        str | None, typer.Option(help="the base model's name (default: smollm2)")
    ] = None,
    max_loras: Annotated[
        int | None,
        typer.Option(help="adapters active in one batch [CPU: max_num_seqs (32); GPU: 4]"),
    ] = None,
    max_lora_rank: Annotated[int | None, typer.Option(help="largest adapter rank [16]")] = None,
    max_model_len: Annotated[
        int | None, typer.Option(help="context window in tokens [2048]")
    ] = None,
    kv_cache_gib: Annotated[int | None, typer.Option(help="CPU KV cache size in GiB [2]")] = None,
    tensor_parallel_size: Annotated[
        int | None, typer.Option(help="GPUs one engine shards the model over [1]")
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None, typer.Option(help="share of each GPU's memory vLLM may use [vLLM's]")
    ] = None,
    max_num_seqs: Annotated[
        int | None, typer.Option(help="sequences decoded per step [32]")
    ] = None,
    max_queued_requests: Annotated[
        int | None, typer.Option(help="requests admitted before 429 [512]")
    ] = None,
    api_key: Annotated[list[str] | None, typer.Option(help="inference key (repeatable)")] = None,
    admin_key: Annotated[str | None, typer.Option(help="key for /admin/ (unset: off)")] = None,
    registry: Annotated[str | None, typer.Option(help="registry DB URL [sqlite in home]")] = None,
    artifacts: Annotated[str | None, typer.Option(help="artifact store URL [file in home]")] = None,
    adapter_cache_gib: Annotated[
        float | None, typer.Option(help="local adapter disk cache in GiB [4]")
    ] = None,
    lora_ops: Annotated[
        str | None, typer.Option(help="CPU LoRA ops: loraplex (default) or vllm")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="auto (bf16 where the CPU has it natively), bfloat16, float32"),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="warning (default), error, info or debug (vLLM's logs too)")
    ] = None,
    drain_seconds: Annotated[
        float | None, typer.Option(help="on SIGINT/SIGTERM, time in-flight requests get [3]")
    ] = None,
    home: Annotated[Path | None, typer.Option(help="data dir [~/.loraplex]")] = None,
) -> None:
    """Serve the OpenAI-compatible API on a vLLM engine, with per-request LoRA adapters."""
    flags = {
        "model": model, "host": host, "port": port, "adapters": adapter or None,
        "served_name": served_name, "max_loras": max_loras, "max_lora_rank": max_lora_rank,
        "max_model_len": max_model_len, "kv_cache_gib": kv_cache_gib,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_num_seqs": max_num_seqs, "max_queued_requests": max_queued_requests,
        "api_keys": api_key or None, "home": home, "admin_key": admin_key,
        "registry": registry, "artifacts": artifacts, "adapter_cache_gib": adapter_cache_gib,
        "lora_ops": lora_ops, "dtype": dtype,
        "log_level": log_level, "drain_seconds": drain_seconds,
    }  # fmt: skip
    try:
        settings = ServeSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from e
    configure_serve_logging(settings.log_level)  # before torch or vLLM is imported
    if settings.log_level in ("warning", "error"):
        exit_fast_and_quietly()
    from server.runner import ServeError, run_server

    model_dir = settings.model or _prepare_model(settings.data_dir())
    try:
        run_server(settings, model_dir=model_dir, console=console)
    except ServeError as e:  # one line; exit 1 when the engine died, 2 when it could not start
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(e.exit_code) from e
