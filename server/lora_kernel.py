"""The CPU LoRA kernel: one C call per LoRA layer for decode-sized batches (`lora_kernel.c`).

Inside vLLM's model run every small torch call costs several microseconds of dispatch, and a
layer's LoRA in torch is four to six of them (convert, shrink, mask, expand per slice, add) for
what is a few microseconds of arithmetic. The kernel does the whole layer, every row on its own
adapter, in one call (no torch headers, so it builds in about a second with the machine's C
compiler). The per-layer call goes through the library's own Python entry point (`rows`) where
Python's headers were there to build it, else through ctypes; setup always uses ctypes.

Built on first use (or ahead of time: `python -m server.lora_kernel`, which scripts/install.sh
runs) into a cache folder (LORAPLEX_KERNEL_DIR, default ~/.cache/loraplex) under a name that
carries the hash of its source and compiler, so a changed source is never run stale. Where no C
compiler is there, or LORAPLEX_LORA_KERNEL=0, `library()` is None and `server.lora_cpu_ops`
computes in torch. LORAPLEX_LORA_KERNEL_ISA=avx2 builds the code of CPUs without AVX-512 alone,
so that it can be tested and timed on CPUs with it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable
from importlib import machinery, util
from pathlib import Path

import torch  # noqa: TID253 - runs inside vLLM's engine processes, which have torch loaded

from loraplex.hardware import cpu_info

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_kernel.c")
ENV_SWITCH = "LORAPLEX_LORA_KERNEL"  # "0": never build or load it
ENV_DIR = "LORAPLEX_KERNEL_DIR"  # where the built library goes (default: ~/.cache/loraplex)
# "0": fp32 arithmetic even where the CPU has AVX512-BF16's dot product (what other CPUs run)
ENV_BF16_DOT = "LORAPLEX_LORA_KERNEL_BF16_DOT"
# "avx2": build the AVX2+FMA code alone (no AVX-512, so no AVX512-BF16 dot product either), the
# code CPUs without AVX-512 run, on any x86-64 CPU with AVX2; unset: every level, chosen at load
ENV_ISA = "LORAPLEX_LORA_KERNEL_ISA"
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's dtype codes


class Layer(ctypes.Structure):
    """`loraplex_layer` of lora_kernel.c, field for field."""

    _fields_ = [
        ("a", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("live", ctypes.c_void_p),
        ("slots", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("out", ctypes.c_int64),
        ("rank", ctypes.c_int64),
        ("slices", ctypes.c_int64),
        ("offsets", ctypes.c_void_p),
        ("dtype", ctypes.c_int64),
        ("ranks", ctypes.c_void_p),
        ("b_pairs", ctypes.c_int64),
    ]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _python_flags() -> list[str]:
    """Compiler flags that make the library a Python extension module too (`rows`), or none
    where Python's headers are not installed."""
    include = sysconfig.get_paths().get("include")
    if not include or not Path(include, "Python.h").exists():
        return []
    return ["-DLORAPLEX_PYTHON", f"-I{include}"]


def _isa_flags() -> list[str]:
    """Compiler flags for the code level $LORAPLEX_LORA_KERNEL_ISA asks for. Raises RuntimeError
    for a level this CPU cannot run or an unknown one."""
    isa = os.environ.get(ENV_ISA, "")
    if not isa:
        return []
    if isa != "avx2":
        raise RuntimeError(f"{ENV_ISA}={isa!r}: the only level is avx2 (unset: every level)")
    if "avx2" not in cpu_info().flags:
        raise RuntimeError(f"{ENV_ISA}=avx2 on a CPU without AVX2 ({cpu_info().model})")
    return ["-DLORAPLEX_ONLY_AVX2"]


def _library_name(source: Path, compiler: str, flags: list[str]) -> str:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout.split("\n", 1)[0]
    python = "-DLORAPLEX_PYTHON" in flags
    extension = (sysconfig.get_config_var("EXT_SUFFIX") or "") if python else ""
    digest = hashlib.sha256(
        source.read_bytes() + version.encode() + " ".join(flags).encode() + extension.encode()
    ).hexdigest()[:16]
    return f"{source.stem}-{platform.machine()}-{digest}.so"


def build_dir() -> Path:
    configured = os.environ.get(ENV_DIR)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraplex"


def build(directory: Path | None = None) -> Path:
    """Compile the kernel into `directory` (default `build_dir()`) unless it is there already;
    the library's path. Raises RuntimeError without a C compiler or when compiling fails."""
    return compile_library(SOURCE, _python_flags() + _isa_flags(), directory, "the CPU LoRA kernel")


def compile_library(source: Path, flags: list[str], directory: Path | None, what: str) -> Path:
    """Compile the C file `source` into a shared library in `directory` (default `build_dir()`)
    under a name that carries the hash of the source, the compiler and `flags`, unless it is
    there already; the library's path. Raises RuntimeError (naming `what`) without a C compiler
    or when compiling fails."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C compiler (cc, gcc or $CC) to build {what}")
    directory = directory or build_dir()
    target = directory / _library_name(source, compiler, flags)
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:  # several processes may build at once
        built = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-std=gnu11", "-shared", "-fPIC", *flags, "-o", str(built)]
        cmd.append(str(source))
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"building {what} failed: {done.stderr.strip()}")
        os.replace(built, target)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernel (built first if needed), or None where it cannot be: then the caller
    computes in torch. Says why once, in the log."""
    loaded = _load()
    return loaded[0] if loaded else None


def rows_call() -> Callable[..., int] | None:
    """The kernel's per-layer entry point, `loraplex_lora_rows(y, y_stride, x, x_stride, dtype,
    row_slots, rows, scale, layer)` with every address an int; None without the kernel."""
    loaded = _load()
    return loaded[1] if loaded else None


def reset() -> None:
    """Forget the loaded kernel: the next use loads it (or declines to) again, under the
    environment of then."""
    _load.cache_clear()


@functools.cache
def _load() -> tuple[ctypes.CDLL, Callable[..., int]] | None:
    if os.environ.get(ENV_SWITCH) == "0":
        return None
    try:
        path = build()
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as e:
        log.warning("loraplex: CPU LoRA kernel unavailable, LoRA computed in torch: %s", e)
        return None
    fn = lib.loraplex_lora_rows
    fn.restype = ctypes.c_int
    # y, y's row stride, x, x's row stride, dtype, row slots, rows, scale, layer
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
    ]  # fmt: skip
    lib.loraplex_bf16_dot.restype = ctypes.c_int
    lib.loraplex_allow_bf16_dot(int(os.environ.get(ENV_BF16_DOT) != "0"))
    openmp = _torch_openmp()
    if openmp is not None:
        lib.loraplex_set_openmp.argtypes = [ctypes.c_void_p] * len(openmp)
        lib.loraplex_set_openmp(*openmp)
    return lib, _python_entry(lib, path) or fn


def _python_entry(lib: ctypes.CDLL, path: Path) -> Callable[..., int] | None:
    """`rows` of the library (`lib`, loaded from `path`) imported as a Python extension module
    (the same loaded library: one copy of its state), or None where it was built without
    Python's headers."""
    if not hasattr(lib, "PyInit__lora_kernel"):
        return None
    loader = machinery.ExtensionFileLoader("_lora_kernel", str(path))
    spec = util.spec_from_file_location("_lora_kernel", path, loader=loader)
    if spec is None:
        return None
    module = util.module_from_spec(spec)
    loader.exec_module(module)
    return module.rows


def _torch_openmp() -> tuple[int, ...] | None:
    """The addresses of GOMP_parallel, GOMP_barrier, omp_get_thread_num, omp_get_num_threads
    and omp_get_max_threads in the OpenMP runtime torch loaded (its wheel carries libgomp), so
    the kernel runs on torch's own threads; None (one thread) where torch uses another."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    found = sorted(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*"))
    names = ("GOMP_parallel", "GOMP_barrier", "omp_get_thread_num", "omp_get_num_threads",
             "omp_get_max_threads")  # fmt: skip
    for path in [*found, None]:  # None: the process's own symbols (a system libgomp)
        try:
            gomp = ctypes.CDLL(str(path) if path else None, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
            return tuple(ctypes.cast(getattr(gomp, n), ctypes.c_void_p).value for n in names)
        except (OSError, AttributeError):
            continue
    return None


def layer(
    a: torch.Tensor,
    b: torch.Tensor,
    live: torch.Tensor,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    rank: int,
) -> Layer:
    """The kernel's view of a layer's weights: a (slots, slices * rank, in), fp32 or bf16; b
    (slots, rank, out) fp32, or bf16 with the ranks in pairs, (slots, ceil(rank / 2), out, 2), for
    AVX512-BF16's dot product (`bf16_pairs`); both contiguous; live (slots,) uint8; offsets
    (slices + 1,) int64; ranks (slots,) int64, each slot's own rank. The tensors must outlive the
    result (it holds their addresses)."""
    pairs = b.dtype == torch.bfloat16
    if not (
        a.dtype in DTYPES
        and (b.dtype == torch.float32 and b.dim() == 3 or pairs and b.shape[-1] == 2)
        and a.is_contiguous()
        and b.is_contiguous()
        and live.dtype == torch.uint8
        and offsets.dtype == torch.int64
        and ranks.dtype == torch.int64
        and ranks.numel() == a.shape[0]
    ):
        raise ValueError("CPU LoRA kernel: weights of an unexpected dtype or layout")  # fmt: skip
    return Layer(
        a.data_ptr(), b.data_ptr(), live.data_ptr(), a.shape[0], a.shape[2], b.shape[2], rank,
        offsets.numel() - 1, offsets.data_ptr(), DTYPES[a.dtype], ranks.data_ptr(), int(pairs),
    )  # fmt: skip


if __name__ == "__main__":
    print(build())
