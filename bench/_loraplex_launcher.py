"""`loraplex serve` with an engine setting it has no flag for, for the tuning experiments only.

`loraplex serve` wraps every linear layer vLLM can give LoRA. This launcher changes, before the
CLI builds the engine, vLLM's `lora_target_modules` (`BENCH_LORA_TARGET_MODULES`,
comma-separated, e.g. "qkv_proj,o_proj"), so its effect can be measured without changing the
server. (The dtype has a flag: `--dtype`.)

    python bench/_loraplex_launcher.py serve --model ... (same flags as `loraplex serve`)
"""

from __future__ import annotations

import os
import sys


def _patch_lora_target_modules(modules: list[str]) -> None:
    import vllm.engine.arg_utils as arg_utils

    original = arg_utils.AsyncEngineArgs

    def engine_args(**kwargs: object) -> object:
        return original(**kwargs, lora_target_modules=modules)

    arg_utils.AsyncEngineArgs = engine_args  # type: ignore[misc, assignment]


if __name__ == "__main__":
    from loraplex.cli import main

    if modules := os.environ.get("BENCH_LORA_TARGET_MODULES"):
        _patch_lora_target_modules([m for m in modules.split(",") if m])
    sys.argv[0] = "loraplex"
    sys.exit(main())
