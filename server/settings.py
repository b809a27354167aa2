"""Runtime settings of `loraplex serve`: flags, else `LORAPLEX_*` environment variables, else
defaults. Built once by the CLI (or a test) and passed down; nothing below reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from server.fine_tuning.settings import FineTuningSettings
from server.request_limits import DEFAULT_MAX_REQUEST_BYTES


class ServeSettings(FineTuningSettings):
    """The server's settings extend the fine-tuning API's, which extend the registry's (data dir,
    database, artifacts, rank limit): one root, read from the environment once, so the registry
    a server opens and its in-process fine-tuning worker are configured by exactly the values
    the server was started with."""

    model: Path | None = Field(default=None, description="local HF model folder; default: embedded")
    served_name: str = "smollm2"
    host: str = "127.0.0.1"
    port: int = 8000
    adapters: list[str] = Field(default_factory=list, description="NAME=PATH local adapters")
    max_loras: int | None = Field(
        default=None,
        ge=1,
        description="adapters active in one batch; default: max_num_seqs on CPU, 4 on GPUs",
    )
    max_cpu_loras: int = Field(default=16, ge=1)
    max_model_len: int = Field(default=2048, ge=64)
    max_num_seqs: int = Field(default=32, ge=1, description="sequences decoded per step")
    max_queued_requests: int = Field(default=512, ge=1, description="beyond this: 429")
    kv_cache_gib: int = Field(default=2, ge=1, description="CPU KV cache size (GiB)")
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        description="GPUs one engine shards the model over (vLLM's tensor parallelism)",
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="share of each GPU's memory vLLM may use (GPU only)"
    )
    lora_ops: Literal["loraplex", "vllm"] = Field(
        default="loraplex",
        description="CPU LoRA ops: loraplex's (fused, base rows isolated) or vLLM's own",
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto",
        description="compute dtype; auto: bf16 where the CPU has it natively, else fp32",
    )
    api_keys: list[str] = Field(default_factory=list, description="inference keys; empty: open")
    admin_key: str | None = Field(default=None, description="key for /admin/; unset: disabled")
    adapter_cache_gib: float = Field(default=4.0, gt=0, description="local adapter disk cache")
    registry_poll_seconds: float = Field(default=1.0, gt=0, description="routing refresh period")
    max_request_bytes: int = Field(
        default=DEFAULT_MAX_REQUEST_BYTES, ge=1024, description="largest inference body; above: 413"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="warning", description="console detail; info/debug also show vLLM's and torch's"
    )
    feedback_ttl_seconds: float = Field(
        default=7 * 86400.0, gt=0, description="how long a completion id stays ratable"
    )
    ab_analysis_seconds: float = Field(
        default=5.0, gt=0, description="period of A/B analysis passes (decisions)"
    )
    drain_seconds: float = Field(
        default=3.0, ge=0, description="on SIGINT/SIGTERM, how long in-flight requests may finish"
    )


# Engine adapter slots when --max-loras is not given. vLLM runs a request only while its adapter
# holds a slot; with fewer slots than distinct adapters in flight, the rest wait for a running
# request to end (bench/scaling.py, AMX Xeon, 8 slots, 64 adapters, 16 in flight: TTFT p99
# 5.1 s, 0.70x the throughput of 8 adapters; 16 slots: 0.72 s, 0.85x). On CPU a slot costs
# ~30 MB of RAM at rank 16 (+838 MiB RSS for 32 slots against 4), so every sequence the engine
# decodes at once gets one: no request ever waits for a slot. On GPUs slots take GPU memory.
GPU_DEFAULT_MAX_LORAS = 4


def engine_max_loras(settings: ServeSettings, backend: str) -> int:
    """--max-loras, else the default for `backend` ('cpu' or 'cuda')."""
    if settings.max_loras is not None:
        return settings.max_loras
    return settings.max_num_seqs if backend == "cpu" else GPU_DEFAULT_MAX_LORAS
