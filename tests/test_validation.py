"""Adapter folder validation: every problem found and reported at once, nothing loaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from registry.validation import validate_adapter_dir

PREFIX = "base_model.model.model.layers.0.self_attn"


def make_adapter(folder: Path, *, rank: int = 8, config: dict | None = None, tensors=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "smollm2",
    }
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is None:
        tensors = {}
        for module in ("q_proj", "v_proj"):
            tensors[f"{PREFIX}.{module}.lora_A.weight"] = np.zeros((rank, 64), np.float32)
            tensors[f"{PREFIX}.{module}.lora_B.weight"] = np.zeros((64, rank), np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_a_valid_adapter_yields_its_manifest(tmp_path):
    report = validate_adapter_dir(make_adapter(tmp_path / "a", rank=8), max_rank=16)
    assert report.ok, report.problems
    assert report.manifest.rank == 8
    assert report.manifest.alpha == 16
    assert report.manifest.target_modules == ("q_proj", "v_proj")
    assert report.manifest.base_model == "smollm2"


def test_every_config_problem_is_reported_together(tmp_path):
    folder = make_adapter(
        tmp_path / "a",
        rank=32,
        config={"use_dora": True, "modules_to_save": ["lm_head"], "peft_type": "IA3"},
    )
    problems = " | ".join(validate_adapter_dir(folder, max_rank=16).problems)
    for expected in ("peft_type", "DoRA", "modules_to_save", "rank 32 is above"):
        assert expected in problems


def test_missing_files_and_not_a_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    problems = validate_adapter_dir(tmp_path / "empty", max_rank=16).problems
    assert problems == ["missing adapter_config.json", "missing adapter_model.safetensors"]
    assert "is not a folder" in validate_adapter_dir(tmp_path / "none", max_rank=16).problems[0]


def test_corrupt_weights_and_config(tmp_path):
    folder = make_adapter(tmp_path / "a")
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    (folder / "adapter_config.json").write_text("{not json")
    problems = " | ".join(validate_adapter_dir(folder, max_rank=16).problems)
    assert "not valid JSON" in problems and "not a readable safetensors" in problems


def test_shapes_must_match_the_rank_and_modules_must_be_supported(tmp_path):
    tensors = {
        f"{PREFIX}.q_proj.lora_A.weight": np.zeros((4, 64), np.float32),
        f"{PREFIX}.q_proj.lora_B.weight": np.zeros((64, 8), np.float32),
        "base_model.model.lm_head.lora_A.weight": np.zeros((8, 64), np.float32),
        "base_model.model.model.embed_tokens.weight": np.zeros((2, 2), np.float32),
    }
    folder = make_adapter(tmp_path / "a", rank=8, tensors=tensors)
    problems = " | ".join(validate_adapter_dir(folder, max_rank=16).problems)
    assert "inconsistent with r=8" in problems
    assert "lm_head" in problems
    assert "embed_tokens.weight' is not a LoRA" in problems


def test_symlinks_are_refused(tmp_path):
    folder = make_adapter(tmp_path / "a")
    (tmp_path / "secret").write_text("x")
    (folder / "extra").symlink_to(tmp_path / "secret")
    problems = validate_adapter_dir(folder, max_rank=16).problems
    assert any("symbolic link" in p for p in problems)


@pytest.mark.parametrize("rank", [0, -1, "8", None])
def test_rank_must_be_a_positive_integer(tmp_path, rank):
    folder = make_adapter(tmp_path / "a", config={"r": rank})
    assert any("positive integer" in p for p in validate_adapter_dir(folder, max_rank=16).problems)
