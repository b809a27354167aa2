"""Which compute dtype this machine runs fast: one decision for serving, training and benchmarks.

bf16 is fast only where the hardware has it natively (CPUs with avx512_bf16 or AMX, GPUs); on
other CPUs torch emulates it, ~30x slower than fp32 on an AVX2-only AMD EPYC (FACTS.md), so the
choice there is fp32. `choose_dtype` is a pure function of the CPU's flags (read from
/proc/cpuinfo by `cpu_info`) so every kind of machine can be tested on any; torch is imported
only by `machine_record`, lazily. This module imports nothing of ours.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Dtype = Literal["auto", "bfloat16", "float32"]
DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float32")
# Flags of /proc/cpuinfo that decide how fast a matmul runs.
MATMUL_FLAGS: tuple[str, ...] = (
    "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile",
)  # fmt: skip
NATIVE_BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")
NO_NATIVE_BF16 = "no " + " or ".join(NATIVE_BF16_FLAGS)
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True, slots=True)
class CpuInfo:
    model: str
    flags: frozenset[str]  # the MATMUL_FLAGS present

    @property
    def native_bf16(self) -> bool:
        return bool(self.flags & set(NATIVE_BF16_FLAGS))


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    dtype: str  # "bfloat16" | "float32", or "auto" on a GPU (vLLM picks from the model)
    reason: str


def parse_cpuinfo(text: str) -> CpuInfo:
    """Model name and matmul flags of the first processor listed in /proc/cpuinfo's text."""
    model, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = frozenset(value.split()) & set(MATMUL_FLAGS)
        if model and flags is not None:
            break
    return CpuInfo(model=model or platform.processor() or "unknown", flags=flags or frozenset())


def cpu_info(path: Path = CPUINFO) -> CpuInfo:
    """This machine's CPU; no flags where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        return parse_cpuinfo(path.read_text(errors="replace"))
    except OSError:
        return CpuInfo(model=platform.processor() or "unknown", flags=frozenset())


def cuda_present() -> bool:
    """An NVIDIA GPU is visible: torch says so where it is already imported, else /dev/nvidia*."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    return any(Path("/dev").glob("nvidia[0-9]*"))


def choose_dtype(
    requested: str = "auto", *, cpu: CpuInfo | None = None, cuda: bool | None = None
) -> DtypeChoice:
    """The dtype to compute in: `requested` when explicit, else what this hardware runs fast."""
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    on_gpu = cuda_present() if cuda is None else cuda
    if requested != "auto":
        reason = "requested with --dtype"
        if requested == "bfloat16" and not on_gpu:
            cpu = cpu or cpu_info()
            if not cpu.native_bf16:
                reason += (
                    f"; warning: this CPU has no native bf16 ({NO_NATIVE_BF16}), so bf16 is "
                    "emulated and much slower than float32"
                )
        return DtypeChoice(dtype=requested, reason=reason)
    if on_gpu:
        return DtypeChoice(dtype="auto", reason="GPU: vLLM picks the dtype from the model")
    cpu = cpu or cpu_info()
    if cpu.native_bf16:
        have = ", ".join(f for f in NATIVE_BF16_FLAGS if f in cpu.flags)
        return DtypeChoice(dtype="bfloat16", reason=f"CPU has native bf16 ({have})")
    return DtypeChoice(
        dtype="float32", reason=f"CPU has no native bf16 ({NO_NATIVE_BF16}): bf16 would be emulated"
    )


def torch_cpu_capability() -> str | None:
    """torch's CPU kernel level ("AVX2", "AVX512", ...); None where torch is not installed."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch  # noqa: TID253 - lazily, only for the record of a benchmark

    return str(torch.backends.cpu.get_cpu_capability())


def machine_record(requested: str = "auto", *, cuda: bool | None = None) -> dict[str, object]:
    """What a benchmark result records about the hardware: CPU, flags, torch's level, dtype."""
    cpu = cpu_info()
    choice = choose_dtype(requested, cpu=cpu, cuda=cuda)
    return {
        "cpu_model": cpu.model,
        "cpu_flags": {flag: flag in cpu.flags for flag in MATMUL_FLAGS},
        "torch_cpu_capability": torch_cpu_capability(),
        "cuda": cuda_present() if cuda is None else cuda,
        "dtype": choice.dtype,
        "dtype_reason": choice.reason,
    }
