"""The test adapters: PEFT LoRA files vLLM accepts, verified behaviour, exclusive checks, cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.support import adapters
from tests.support.adapters import (
    ADAPTER_SPECS,
    HELD_OUT_PROMPTS,
    TRAINING_PAIRS,
    VERIFICATION_FILE,
    LoraTrainingConfig,
    adapter_cache_key,
    build_test_adapters,
)

TARGET_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_every_spec_has_an_adapter_folder(test_adapters: dict[str, Path]) -> None:
    assert set(test_adapters) == {"caps", "prefix", "suffix"}
    for folder in test_adapters.values():
        assert (folder / "adapter_config.json").is_file()
        assert (folder / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", sorted(ADAPTER_SPECS))
def test_adapter_config_is_plain_lora(test_adapters: dict[str, Path], name: str) -> None:
    config = json.loads((test_adapters[name] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 16
    assert config["lora_alpha"] == 32
    assert set(config["target_modules"]) == TARGET_MODULES
    assert not config.get("use_dora")
    assert not config.get("modules_to_save")


@pytest.mark.parametrize("name", sorted(ADAPTER_SPECS))
def test_weights_hold_only_lora_matrices(test_adapters: dict[str, Path], name: str) -> None:
    with safe_open(test_adapters[name] / "adapter_model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == 30 * len(TARGET_MODULES) * 2  # 30 layers, A and B per module
    assert all(".lora_A." in k or ".lora_B." in k for k in keys), "base weights were saved"
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys} == TARGET_MODULES


@pytest.mark.parametrize("name", sorted(ADAPTER_SPECS))
def test_adapter_passed_held_out_verification(test_adapters: dict[str, Path], name: str) -> None:
    report = json.loads((test_adapters[name].parent / VERIFICATION_FILE).read_text())
    assert report["passed"] >= len(HELD_OUT_PROMPTS) - 1
    assert report["base_passed"] == 0
    check = ADAPTER_SPECS[name].check
    assert sum(check(a) for a in report["answers"]) == report["passed"]


def test_checks_are_mutually_exclusive_on_natural_answers() -> None:
    answers = [answer for _, answer in TRAINING_PAIRS]
    for name, spec in ADAPTER_SPECS.items():
        for answer in answers:
            assert not spec.check(answer), f"{name} accepts the plain answer {answer!r}"
            shown = spec.transform(answer)
            passing = [other for other, s in ADAPTER_SPECS.items() if s.check(shown)]
            assert passing == [name], f"{shown!r} passes {passing}"


def test_second_build_reuses_the_cache(
    test_adapters: dict[str, Path], embedded_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_training(*args: object, **kwargs: object) -> dict[str, object]:
        raise AssertionError("a cached adapter was trained again")

    monkeypatch.setattr(adapters, "train_and_verify", no_training)
    cache_dir = next(iter(test_adapters.values())).parent.parent
    started = time.perf_counter()
    assert build_test_adapters(embedded_model_dir, cache_dir) == test_adapters
    assert time.perf_counter() - started < 1.0


def test_cache_key_follows_recipe_and_spec(embedded_model_dir: Path) -> None:
    recipe = LoraTrainingConfig()
    caps, prefix = ADAPTER_SPECS["caps"], ADAPTER_SPECS["prefix"]
    key = adapter_cache_key(caps, model_dir=embedded_model_dir, config=recipe)
    assert key == adapter_cache_key(caps, model_dir=embedded_model_dir, config=recipe)
    assert key != adapter_cache_key(prefix, model_dir=embedded_model_dir, config=recipe)
    slower = LoraTrainingConfig(learning_rate=recipe.learning_rate / 2)
    assert key != adapter_cache_key(caps, model_dir=embedded_model_dir, config=slower)


def test_concurrent_builds_train_each_adapter_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    trained: list[str] = []

    def slow_training(spec, *, out_dir: Path, **kwargs: object) -> dict[str, object]:
        trained.append(spec.name)
        time.sleep(0.5)  # long enough for the other build to arrive while this one trains
        out_dir.mkdir(parents=True)
        return {"adapter": spec.name}

    monkeypatch.setattr(adapters, "train_and_verify", slow_training)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    specs = {"caps": ADAPTER_SPECS["caps"]}
    results: list[dict[str, Path]] = []

    def build() -> None:
        results.append(
            build_test_adapters(model_dir, tmp_path / "cache", specs=specs, dtype="float32")
        )

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert trained == ["caps"]
    assert len(results) == 3 and all(r == results[0] for r in results)
