"""What every process vLLM spawns from `loraplex serve` (engine core, model worker) does first,
and how every process of `loraplex serve` exits quickly and quietly.

vLLM starts them with multiprocessing's "spawn": each is a fresh interpreter that re-imports the
console script, hence `loraplex.cli` and `server.cli`, before any vLLM module. That import calls
`prepare_spawned_engine_process()`, which does nothing in any other process.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import multiprocessing
import os
import sys
import threading
import time


def prepare_spawned_engine_process() -> None:
    # A spawned child gets its process name (vLLM: "EngineCore", "VllmWorker-0") before it
    # re-imports the main module; its sys.argv is the parent's by then.
    if multiprocessing.current_process().name == "MainProcess":
        return
    # Ctrl-C in a terminal signals the whole foreground process group. vLLM's engine core and
    # worker then start tearing themselves down while `loraplex serve` stops them too: the core
    # gets SIGTERM in the middle of its teardown (its handler is reset by then), dies before
    # unlinking its shared-memory queue, and the resource tracker warns about a leaked
    # shared_memory object. In their own process group only the server gets Ctrl-C and stops
    # them in order, as for a SIGTERM from a supervisor.
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    # Outside the server's process group nothing stops them when the server itself is killed
    # (SIGKILL, the OOM killer): the engine core and its worker would stay, ~2.5 GB a pair.
    _exit_with_parent()
    # vLLM 0.32 configures logging lazily, per process, and logs import-time warnings ("Triton
    # is installed, but doesn't include CPU backend") before that, through Python's last-resort
    # handler; apply the level `loraplex serve` chose (server.console_logging) now.
    level = os.environ.get("VLLM_LOGGING_LEVEL", "")
    if level:
        logging.getLogger("vllm").setLevel(level.upper())
    if level.upper() in ("WARNING", "ERROR", "CRITICAL"):  # a quiet console (not info/debug)
        exit_fast_and_quietly()


def _exit_with_parent(period: float = 0.5) -> None:
    """Exit as soon as the process that started this one is gone. A watcher thread, not
    PR_SET_PDEATHSIG: that signal fires when the parent's *thread* that started the child ends,
    and vLLM starts its engine core from a worker thread of the server."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        os._exit(1)

    threading.Thread(target=watch, name="loraplex-parent-watch", daemon=True).start()


def exit_fast_and_quietly() -> None:
    """At exit, skip the interpreter's last garbage collection over the heap torch and the model
    leave: 2-3 s per process on 2 busy cores (measured with py-spy), paid one process after
    another (worker, engine core, server) on every stop. The OS reclaims the memory anyway;
    vLLM freezes the heap in its engine core's teardown on ROCm for the same reason.

    What finalization still prints is teardown noise: nanobind reports the frozen objects of
    triton's bindings as leaks, and `__del__` methods fail on torn-down modules. Registered
    before any library's exit handler, so it runs after all of them."""
    atexit.register(_freeze_and_silence)


def _freeze_and_silence() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    gc.freeze()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
