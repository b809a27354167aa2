"""`loraplex serve` with engine settings it has no flag for, for the tuning experiments only.

`loraplex serve` always runs bfloat16 and wraps every linear layer vLLM can give LoRA. This
launcher changes, before the CLI builds the engine, the engine dtype (`BENCH_ENGINE_DTYPE`) and
vLLM's `lora_target_modules` (`BENCH_LORA_TARGET_MODULES`, comma-separated, e.g.
"qkv_proj,o_proj"), so their effect can be measured without changing the server.

    python bench/_loraplex_launcher.py serve --model ... (same flags as `loraplex serve`)
"""

from __future__ import annotations

import functools
import os
import sys


def _patch_engine_dtype(dtype: str) -> None:
    import server.engine_vllm as engine_vllm

    engine_vllm.VllmEngineSettings = functools.partial(  # type: ignore[misc]
        engine_vllm.VllmEngineSettings, dtype=dtype
    )


def _patch_lora_target_modules(modules: list[str]) -> None:
    import vllm.engine.arg_utils as arg_utils

    original = arg_utils.AsyncEngineArgs

    def engine_args(**kwargs: object) -> object:
        return original(**kwargs, lora_target_modules=modules)

    arg_utils.AsyncEngineArgs = engine_args  # type: ignore[misc, assignment]


if __name__ == "__main__":
    from loraplex.cli import main

    if dtype := os.environ.get("BENCH_ENGINE_DTYPE"):
        _patch_engine_dtype(dtype)
    if modules := os.environ.get("BENCH_LORA_TARGET_MODULES"):
        _patch_lora_target_modules([m for m in modules.split(",") if m])
    sys.argv[0] = "loraplex"
    sys.exit(main())
