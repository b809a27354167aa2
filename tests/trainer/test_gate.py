"""The train/serve agreement gate on the real engine: a trained adapter passes (vLLM accepts it,
its served answers agree with peft's, stop by themselves and differ from the base); the same
adapter with its B matrices zeroed is caught as a no-op."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.adapters import HELD_OUT_PROMPTS
from trainer.gate import run_gate

PROMPTS = list(HELD_OUT_PROMPTS[:4])


@pytest.mark.engine
def test_a_trained_adapter_passes_the_gate(embedded_model_dir: Path, test_adapters):
    result = run_gate(
        model_dir=embedded_model_dir, adapter_dir=test_adapters["caps"], prompts=PROMPTS
    )
    assert result.passed, result.problems
    assert result.accepted and result.changed_share >= 0.75
    assert result.agreement >= 0.6 and result.ended_share >= 0.75
    assert all(c.served.upper() == c.served for c in result.checks)  # caps, as served


@pytest.mark.engine
def test_a_no_op_adapter_fails_the_gate(embedded_model_dir: Path, test_adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    noop = tmp_path / "noop"
    shutil.copytree(test_adapters["caps"], noop)
    weights = noop / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: (v * 0 if "lora_B" in k else v) for k, v in tensors.items()}, weights)
    result = run_gate(model_dir=embedded_model_dir, adapter_dir=noop, prompts=PROMPTS)
    assert not result.passed
    assert any("no-op" in p for p in result.problems), result.problems
    assert result.changed_share == 0
