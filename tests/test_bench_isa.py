"""bench/_isa.py: `--isa avx2` really runs the AVX2 code of every layer that picks its code from
the CPU (checked in a fresh process, as the benchmark's worker starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import _isa
from loraplex.hardware import cpu_info

pytest.importorskip("vllm")
ROOT = Path(__file__).resolve().parents[1]
# Load vLLM's C++ ops as its CPU platform does, run one dense layer through its oneDNN matmul
# (what every linear layer of the model runs in fp32) and say which code ran.
PROBE = """
import json, os, sys
from bench import _isa
_isa.patch_torch(sys.argv[1])
import torch
from vllm.platforms import current_platform
current_platform.import_kernels()
from vllm import _custom_ops as ops
handle = ops.create_onednn_mm(torch.randn(64, 32).t(), 32)
ops.onednn_mm(handle, torch.randn(4, 32), None)
print("CODE", json.dumps(_isa.code_in_use()), flush=True)
"""


def _probe(isa: str, tmp_path: Path) -> tuple[dict, str]:
    env = os.environ | _isa.environment(isa) | {
        "ONEDNN_VERBOSE": "1", "VLLM_TARGET_DEVICE": "cpu", "LORAPLEX_KERNEL_DIR": str(tmp_path),
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", PROBE, isa], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("CODE "))
    return json.loads(line[5:]), done.stdout


@pytest.mark.skipif("avx2" not in cpu_info().flags, reason="this CPU has no AVX2")
def test_avx2_runs_the_avx2_code_of_torch_onednn_vllm_and_the_lora_kernel(tmp_path):
    code, out = _probe("avx2", tmp_path)
    assert code["torch_cpu_capability"] == "AVX2"
    assert code["vllm_libraries"] == ["_C_AVX2"]
    assert code["lora_kernel_only_avx2"] and not code["lora_kernel_bf16_dot"]
    matmuls = [x for x in out.splitlines() if ",exec,cpu,matmul," in x]
    assert matmuls and all(":avx2," in x for x in matmuls), matmuls
    assert _isa.emulated_cpu("avx2").flags == {"avx2"}


def test_native_changes_nothing(tmp_path):
    assert _isa.environment("native") == {}
    code, _ = _probe("native", tmp_path)
    assert code["vllm_libraries"] != ["_C_AVX2"] or "avx512f" not in cpu_info().flags
    assert not code["lora_kernel_only_avx2"]
    with pytest.raises(ValueError, match="isa must be one of"):
        _isa.environment("avx512")
