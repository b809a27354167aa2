"""Run an engine on the code a CPU without AVX-512 runs, on a CPU with it (`--isa avx2`).

Some machines of this kind have AVX-512 with native bf16 (and AMX), others AVX2 only (FACTS.md).
Where only the first kind is at hand, the second's *code paths* can still be run and timed:
every layer that picks its code from the CPU is told the CPU has AVX2 and no more.

  torch's own kernels     ATEN_CPU_CAPABILITY=avx2 (read when torch loads)
  oneDNN (torch's, and vLLM's onednn_mm for every dense layer)
                          ONEDNN_MAX_CPU_ISA=AVX2 (read at its first primitive)
  MKL                     MKL_ENABLE_INSTRUCTIONS=AVX2
  vLLM's C++ ops          it loads `_C_AVX2` instead of `_C` (attention "vec", norms, rotary),
                          from torch.cpu's feature checks, which `patch_torch` answers
  loraplex's LoRA kernel  LORAPLEX_LORA_KERNEL_ISA=avx2 (its AVX2+FMA build alone)
  dtype                   float32, what loraplex chooses without native bf16

What this does not reproduce is the hardware: an AVX2-only CPU's cores, caches and memory (the
AMD EPYC Zen 3 of FACTS.md ran plain fp32 ~3.6x slower than the AVX-512 machine). The figures
say what the code paths cost on this CPU, not what that CPU does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loraplex.hardware import CpuInfo, cpu_info

ISAS = ("native", "avx2")
ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "LORAPLEX_LORA_KERNEL_ISA": "avx2",
}
# torch.cpu's feature checks that vLLM consults to pick its C++ library and kernels.
FEATURE_CHECKS = (
    "_is_avx512_supported", "_is_avx512_bf16_supported", "_is_avx512_vnni_supported",
    "_is_amx_tile_supported", "_is_amx_fp16_supported",
)  # fmt: skip


def environment(isa: str) -> dict[str, str]:
    """The variables a process must start with to run `isa`'s code (none for "native")."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    if isa == "native":
        return {}
    if "avx2" not in cpu_info().flags:
        raise SystemExit("error: --isa avx2 needs a CPU with AVX2")
    return dict(ENV)


def emulated_cpu(isa: str) -> CpuInfo:
    """The CPU as loraplex's dtype choice should see it under `isa`."""
    cpu = cpu_info()
    return cpu if isa == "native" else CpuInfo(model=cpu.model, flags=cpu.flags & {"avx2"})


def patch_torch(isa: str) -> None:
    """Make torch.cpu's feature checks answer as an AVX2-only CPU would (before vLLM loads)."""
    if isa == "native":
        return
    import torch  # noqa: TID253 - only inside the benchmark's engine process

    for name in FEATURE_CHECKS:
        if hasattr(torch.cpu, name):
            setattr(torch.cpu, name, lambda: False)


def code_in_use() -> dict[str, object]:
    """What this process runs, to check an emulation took: torch's level, vLLM's C++ library,
    oneDNN's limit and the LoRA kernel's build."""
    import torch  # noqa: TID253 - only inside the benchmark's engine process

    maps = Path("/proc/self/maps").read_text()
    libraries = sorted(set(re.findall(r"vllm/(_C\w*)\.abi3\.so", maps)))
    from server import lora_kernel

    library = lora_kernel.library()
    return {
        "torch_cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "vllm_libraries": libraries,
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "lora_kernel_only_avx2": bool(library and library.loraplex_only_avx2()),
        "lora_kernel_bf16_dot": bool(library and library.loraplex_bf16_dot()),
    }
