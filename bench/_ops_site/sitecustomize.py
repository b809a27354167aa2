"""Experiment-only hook for bench/tuning.py's "stacked_ops": with BENCH_LORA_OPS=stacked, swap
the CPU LoRA ops that loraplex's vLLM plugin installs for those of bench/_lora_stacked.py.

Put this folder and the repository root on PYTHONPATH of `loraplex serve`: Python imports
`sitecustomize` at start in every process, including vLLM's engine core and workers, before
vLLM's plugin loader calls `server.vllm_patches.register`, which installs the module's (now
replaced) functions. Without BENCH_LORA_OPS it does nothing; raw vLLM stays unpatched either way
(`register` needs LORAPLEX_VLLM_PATCHES=1).
"""

import os

if os.environ.get("BENCH_LORA_OPS") == "stacked":
    import server.vllm_patches as _patches
    from bench import _lora_stacked as _stacked

    _patches.bgmv_shrink = _stacked.bgmv_shrink
    _patches.bgmv_expand_slice = _stacked.bgmv_expand_slice
