"""What `loraplex serve` prints: its own lines, warnings and errors. Library chatter (vLLM's INFO
lines and import-time warnings such as "Triton is installed, but doesn't include CPU backend",
torch's FutureWarnings and C++ notices, weight-loading progress bars) shows only with
`--log-level info` or `debug`.

It is set up before vLLM is imported, in this process and, through the environment, in the engine
processes vLLM spawns; settings a user put in the environment always win.
"""

from __future__ import annotations

import logging
import os
import warnings

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
LIBRARY_LOGGERS = ("vllm", "torch", "transformers", "huggingface_hub")
# Python warnings silenced by default: raised inside vLLM/torch, nothing a user can act on.
QUIET_WARNINGS: tuple[type[Warning], ...] = (FutureWarning, DeprecationWarning)


def configure_serve_logging(level: str) -> None:
    """Console detail for `loraplex serve`: "debug", "info", "warning" (default) or "error"."""
    ours = getattr(logging, level.upper())
    logging.basicConfig(level=ours, format=LOG_FORMAT)
    verbose = ours <= logging.INFO
    library = level.upper() if verbose else "ERROR"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", library)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library)
    if verbose:
        return
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10's "[W...] Warning: NUMA ..."
    # PYTHONWARNINGS reaches the engine processes: each is a fresh interpreter.
    specs = ",".join(f"ignore::{category.__name__}" for category in QUIET_WARNINGS)
    os.environ.setdefault("PYTHONWARNINGS", specs)
    for category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", category=category)
