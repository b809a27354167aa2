"""Adapter folder validation: every problem found and reported at once, nothing loaded; crafted
files end as listed problems, never exceptions; shapes and module names come from the base
model's own config."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from registry.base_model import BaseModel, load_base_model
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


# --- crafted files: every one ends as a listed problem, never an exception --------------------


def raw_safetensors(path: Path, header: bytes, *, length: int | None = None, data: bytes = b""):
    """A weights file with exactly these header bytes (and header length field)."""
    size = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + header + data)


def entry(shape, dtype="F32", offsets=None) -> dict:
    size = 4 * shape[0] * shape[1] if all(isinstance(d, int) for d in shape) else 0
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets or [0, size]}


def header_file(tensors: dict) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        header = json.dumps(tensors).encode()
        data_bytes = max(
            (t["data_offsets"][1] for t in tensors.values() if isinstance(t, dict)), default=0
        )
        raw_safetensors(folder / "adapter_model.safetensors", header, data=b"\0" * data_bytes)

    return write


def weights(data: bytes, *, length: int | None = None) -> Callable[[Path], None]:
    return lambda folder: raw_safetensors(folder / "adapter_model.safetensors", data, length=length)


def config_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / "adapter_config.json").write_bytes(data)


def config_values(**values) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | values))

    return write


A = f"{PREFIX}.q_proj.lora_A.weight"
B = f"{PREFIX}.q_proj.lora_B.weight"
CRAFTED = {
    "header-json-array": (weights(b"[1, 2, 3]"), "header is JSON but not an object"),
    "header-json-string": (weights(b'"tensors"'), "header is JSON but not an object"),
    "header-longer-than-file": (weights(b"{}", length=10**6), "does not fit"),
    "header-empty": (weights(b""), "not a readable safetensors"),
    "file-of-three-bytes": (
        lambda folder: (folder / "adapter_model.safetensors").write_bytes(b"abc"),
        "shorter than a header length",
    ),
    "header-not-utf8": (weights(b'{"\xff\xfe": 1}'), "not a readable safetensors"),
    "header-deeply-nested": (weights(b"[" * 200_000 + b"]" * 200_000), "not a readable"),
    "tensor-entry-not-object": (header_file({A: 5, B: entry([64, 8])}), "malformed header entry"),
    "shape-of-strings": (header_file({A: entry(["8", 64]), B: entry([64, 8])}), "expected 2 dim"),
    "shape-of-bools": (header_file({A: entry([True, 64]), B: entry([64, 8])}), "expected 2 dim"),
    "integer-dtype": (header_file({A: entry([8, 64], "I64"), B: entry([64, 8])}), "dtype 'I64'"),
    "offsets-past-the-data": (
        header_file({A: entry([8, 64], offsets=[0, 10**9]), B: entry([64, 8])}),
        "data_offsets",
    ),
    "a-without-b": (header_file({A: entry([8, 64])}), "has no lora_B weight"),
    "alpha-a-string": (config_values(lora_alpha="abc"), "lora_alpha must be a positive number"),
    "alpha-negative": (config_values(lora_alpha=-4), "lora_alpha must be a positive number"),
    "alpha-a-list": (config_values(lora_alpha=[16]), "lora_alpha must be a positive number"),
    "alpha-nan": (config_bytes(b'{"peft_type": "LORA", "r": 8, "lora_alpha": NaN}'), "lora_alpha"),
    "rank-negative": (config_values(r=-1), "r must be a positive integer"),
    "rank-true": (config_values(r=True), "r must be a positive integer"),
    "rank-float": (config_values(r=8.0), "r must be a positive integer"),
    "targets-a-number": (config_values(target_modules=5), "target_modules must be"),
    "targets-of-numbers": (config_values(target_modules=[1, 2]), "target_modules must be"),
    "targets-a-dict": (config_values(target_modules={"q": 1}), "target_modules must be"),
    "config-not-utf8": (config_bytes(b'{"r": 8, "peft_type": "LORA\xff"}'), "not valid JSON"),
    "config-json-array": (config_bytes(b"[8]"), "must hold a JSON object"),
    "config-deeply-nested": (config_bytes(b"[" * 200_000 + b"]" * 200_000), "not valid JSON"),
    "config-huge": (config_bytes(b'{"x": "' + b"a" * (2 * 1024**2) + b'"}'), "larger than"),
}


@pytest.mark.parametrize("craft, expected", CRAFTED.values(), ids=CRAFTED.keys())
def test_crafted_files_are_reported_not_raised(tmp_path, craft, expected):
    folder = make_adapter(tmp_path / "a")
    craft(folder)
    report = validate_adapter_dir(folder, max_rank=16)
    assert not report.ok and report.manifest is None
    assert any(expected in p for p in report.problems), report.problems
    assert all(len(p) < 600 for p in report.problems)  # bounded, whatever the input


# --- the base model's own config decides module names and shapes ------------------------------

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 100,
}


def base_from(tmp_path: Path, config: dict) -> BaseModel:
    folder = tmp_path / "base"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return load_base_model("tiny", folder, embedded=False)


def lora_pair(module: str, *, rank: int, in_features: int, out_features: int, layer: int = 0):
    block = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
    prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
    return {
        f"{prefix}.lora_A.weight": np.zeros((rank, in_features), np.float32),
        f"{prefix}.lora_B.weight": np.zeros((out_features, rank), np.float32),
    }


def test_shapes_follow_the_base_models_config(tmp_path):
    base = base_from(tmp_path, TINY_LLAMA)
    # head_dim = 64 / 4 = 16; k/v project to 2 kv heads * 16 = 32.
    assert dict(base.modules) == {
        "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
        "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64),
    }  # fmt: skip
    good = {
        **lora_pair("v_proj", rank=8, in_features=64, out_features=32),
        **lora_pair("down_proj", rank=8, in_features=128, out_features=64, layer=1),
    }
    folder = make_adapter(tmp_path / "good", tensors=good)
    assert validate_adapter_dir(folder, max_rank=16, base=base).problems == []

    # The 64-wide v_proj of the adapter above fits Llama's MHA layout, not this GQA base.
    mha = make_adapter(tmp_path / "mha")
    problems = validate_adapter_dir(mha, max_rank=16, base=base).problems
    assert problems == [
        f"tensor '{PREFIX}.v_proj.lora_B.weight' has shape [64, 8]; the base model's v_proj "
        "(64 -> 32) needs [32, 8]"
    ]


def test_module_names_and_layers_come_from_the_base(tmp_path):
    base = base_from(tmp_path, TINY_LLAMA | {"head_dim": 8})
    tensors = {
        **lora_pair("q_proj", rank=4, in_features=64, out_features=32, layer=2),
        **lora_pair("c_attn", rank=4, in_features=64, out_features=192),
    }
    folder = make_adapter(tmp_path / "a", rank=4, tensors=tensors)
    problems = " | ".join(validate_adapter_dir(folder, max_rank=16, base=base).problems)
    assert "is for layer 2 but the base model has 2 layers" in problems
    assert "target modules ['c_attn'] are not linear layers of the base model (llama)" in problems


def test_an_unusable_base_config_is_a_problem_not_an_exception(tmp_path):
    base = base_from(tmp_path, TINY_LLAMA | {"hidden_size": "wide"})
    problems = validate_adapter_dir(make_adapter(tmp_path / "a"), max_rank=16, base=base).problems
    assert problems == [
        "the base model's config cannot be used: hidden_size must be a positive integer, got 'wide'"
    ]
    (tmp_path / "base" / "config.json").write_bytes(b"\xff")
    unreadable = load_base_model("tiny", tmp_path / "base", embedded=False)
    assert "cannot be read" in unreadable.problem


def test_serve_checks_local_adapters_against_the_served_model(tmp_path: Path, embedded_model_dir):
    """`loraplex serve --adapter` refuses, before the engine starts, a folder whose tensors do not
    fit the model it would be served on (SmolLM2's 576-wide attention, not this 64-wide one)."""
    from prometheus_client import CollectorRegistry

    from server.engine_fake import FakeEngine
    from server.metrics import ServerMetrics
    from server.runner import ServeError, build_resolver
    from server.settings import ServeSettings

    folder = make_adapter(tmp_path / "narrow")
    settings = ServeSettings(
        home=tmp_path / "home", model=embedded_model_dir, adapters=[f"narrow={folder}"]
    )
    metrics = ServerMetrics(CollectorRegistry())
    with pytest.raises(ServeError, match=r"narrow: .*(shape|576)"):
        build_resolver(settings, engine=FakeEngine(), metrics=metrics)
