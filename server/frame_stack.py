"""Keep CPython from mapping and unmapping a frame-stack chunk on every call of a hot function.

CPython 3.11 keeps Python frames on a per-thread stack of 16 KiB chunks taken from its arena
allocator (mmap). A call that does not fit in the current chunk maps a new one, and the return
unmaps it at once, so a function called in a loop from exactly that depth maps and unmaps 16
KiB per call (CPython issue gh-142183, "Calls across stack chunks perform badly"; fixed in
3.13 and 3.14 by keeping one chunk per thread, not in 3.11 or 3.12).

vLLM's compiled model calls loraplex's ops (Python functions) 120 times a step from one depth,
and whether that depth sits on a chunk boundary depends on everything above it. Where it did,
in `loraplex serve`'s model worker, each unmap flushed the TLB of the worker's other thread
with an inter-processor interrupt (expensive in a VM), and the server served 25-35 % fewer
tokens a second, in base traffic too (bench/README, "Results (2026-12-07, 15:00 ..."). The
same build in a single process (bench/lora_cpu.py) was faster: there the depth was elsewhere.

`install()` puts a small cache in front of the arena allocator (`frame_stack.c`): freed blocks
of up to 64 KiB, eight at most, are handed out again instead of unmapped and mapped anew.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from pathlib import Path

from server import lora_kernel

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("frame_stack.c")
ENV_SWITCH = "LORAPLEX_FRAME_STACK_CACHE"  # "0": no cache (CPython's own allocator)


class _ArenaAllocator(ctypes.Structure):
    """CPython's PyObjectArenaAllocator (stable C API)."""

    _fields_ = [("ctx", ctypes.c_void_p), ("alloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]


@functools.cache
def install() -> ctypes.CDLL | None:
    """Install the cache in this process (once; later calls return the same); the loaded library,
    or None where it could not be built (no C compiler): then CPython's allocator stays, and
    the warning says so once. LORAPLEX_FRAME_STACK_CACHE=0 leaves CPython's allocator alone
    (returns None)."""
    if os.environ.get(ENV_SWITCH) == "0":
        return None
    if not getattr(sys, "_is_gil_enabled", lambda: True)():
        return None  # free-threaded CPython: the cache relies on the GIL for its lock
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as e:
        log.warning("loraplex: no frame-stack cache (calls may map memory per call): %s", e)
        return None
    current, cache = _ArenaAllocator(), _ArenaAllocator()
    ctypes.pythonapi.PyObject_GetArenaAllocator(ctypes.byref(current))
    lib.loraplex_frame_stack_cache(ctypes.byref(current), ctypes.byref(cache))
    ctypes.pythonapi.PyObject_SetArenaAllocator(ctypes.byref(cache))  # CPython copies the struct
    for name in ("loraplex_frame_stack_reused", "loraplex_frame_stack_passed"):
        getattr(lib, name).restype = ctypes.c_uint64
    return lib


def counts() -> tuple[int, int] | None:
    """(allocations served from the cache, allocations passed to CPython's allocator) since
    `install()`, or None where the cache is not installed."""
    if not install.cache_info().currsize:
        return None
    lib = install()
    if lib is None:
        return None
    return lib.loraplex_frame_stack_reused(), lib.loraplex_frame_stack_passed()


def build() -> Path:
    """Compile the cache's library (see `server.lora_kernel.compile_library`); its path."""
    return lora_kernel.compile_library(SOURCE, [], None, "the frame-stack cache")


if __name__ == "__main__":
    print(build())
