"""The base model adapters are served on: one identity for the embedded model however an adapter
names it (its local folder, a copy of it, its hub id, nothing), and shapes and module names
checked against that model's own config.json. Adapters here are made by peft itself, on a tiny
Llama saved where the embedded model lives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from registry.base_model import EMBEDDED_MODEL_FOLDER, EMBEDDED_MODEL_ID
from registry.errors import AdapterRejectedError
from registry.service import Registry
from registry.store import VersionSpec

TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 128,
}


@pytest.fixture(scope="module")
def peft_made(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny Llama saved as the embedded model's folder, a peft LoRA trained-on-it folder)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("peft")
    model_dir = root / "models" / EMBEDDED_MODEL_FOLDER
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA)).save_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapter do something
            torch.nn.init.normal_(param)
    peft_model.save_pretrained(root / "adapter")
    return model_dir, root / "adapter"


def adapter_naming(peft_made, tmp_path: Path, base: str | None, tag: str) -> Path:
    """The peft adapter with `base_model_name_or_path` set to `base` (removed when None)."""
    folder = tmp_path / tag
    shutil.copytree(peft_made[1], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.pop("base_model_name_or_path", None)
    if base is not None:
        config["base_model_name_or_path"] = base
    config["lora_alpha"] = 8 + len(tag)  # distinct bytes, so each is its own archive
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def embedded_settings(settings, peft_made):
    """Registry settings whose data dir holds the (tiny) embedded model."""
    home = settings.home
    (home / "models").mkdir(parents=True)
    shutil.copytree(peft_made[0], home / "models" / EMBEDDED_MODEL_FOLDER)
    return settings


def test_the_embedded_model_has_one_identity(embedded_settings, peft_made, tmp_path):
    trained = json.loads((peft_made[1] / "adapter_config.json").read_text())
    assert Path(trained["base_model_name_or_path"]).name == EMBEDDED_MODEL_FOLDER  # peft's own
    copy = tmp_path / "elsewhere" / "my-smollm"
    shutil.copytree(peft_made[0], copy)
    declared = {
        "peft": trained["base_model_name_or_path"],
        "served-folder": str(embedded_settings.home / "models" / EMBEDDED_MODEL_FOLDER),
        "hub-id": EMBEDDED_MODEL_ID,
        "nothing": None,
        "a-copy-of-the-folder": str(copy),
    }
    with Registry.open(embedded_settings) as registry:
        versions = [
            registry.register("support", adapter_naming(peft_made, tmp_path, base, tag), actor="t")
            for tag, base in declared.items()
        ]
        assert [(v.number, v.base_model) for v in versions] == [(n, "smollm2") for n in range(1, 6)]
        other = adapter_naming(peft_made, tmp_path, "Qwen/Qwen2.5-0.5B", "other")
        with pytest.raises(AdapterRejectedError, match="base model mismatch"):
            registry.register("support", other, actor="t")


def test_adapters_are_checked_against_the_served_models_config(
    embedded_settings, peft_made, make_adapter, tmp_path
):
    with Registry.open(embedded_settings) as registry:
        assert registry.register("fits", peft_made[1], actor="t").target_modules == (
            "down_proj",
            "q_proj",
            "v_proj",
        )
        # Llama-style MHA shapes (v_proj 64 -> 64) do not fit this GQA base (64 -> 32).
        with pytest.raises(AdapterRejectedError) as caught:
            registry.register("misfit", make_adapter(rank=4), actor="t")
    assert caught.value.problems == [
        "tensor 'base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight' has shape "
        "[64, 4]; the base model's v_proj (64 -> 32) needs [32, 4]"
    ]
    assert registry.store.find_base_model("misfit") is None


def test_a_name_recorded_under_an_older_identity_keeps_accepting_versions(registry, make_adapter):
    # Before one identity, a path-named adapter was recorded as its folder name.
    spec = VersionSpec(
        sha256="ab" * 32,
        size_bytes=1,
        base_model=EMBEDDED_MODEL_FOLDER,
        rank=8,
        alpha=16,
        target_modules=("q_proj",),
    )
    registry.store.add_version("old", spec, actor="t")
    version = registry.register("old", make_adapter(base_model=None), actor="t")
    assert (version.number, version.base_model) == (2, EMBEDDED_MODEL_FOLDER)


def test_a_configured_base_folder_without_a_config_refuses_everything(settings, make_adapter):
    missing = settings.model_copy(update={"base_model_dir": settings.home / "no-model"})
    with Registry.open(missing) as registry, pytest.raises(AdapterRejectedError) as caught:
        registry.register("x", make_adapter(), actor="t")
    assert caught.value.problems[0].startswith("the base model's ")
    assert "no-model/config.json cannot be read" in caught.value.problems[0]


def test_the_registry_names_the_embedded_model_as_the_server_installs_it():
    from server import embedded_model

    assert EMBEDDED_MODEL_FOLDER == embedded_model.MODEL_FOLDER_NAME
    assert embedded_model.GGUF_MEMBER.rsplit("/", 1)[-1].startswith(EMBEDDED_MODEL_ID.split("/")[1])
