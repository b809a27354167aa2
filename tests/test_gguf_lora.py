"""bench/gguf_lora.py: PEFT LoRA folders written as GGUF LoRA files that llama.cpp's server loads.

The layout checks read the written file back with the `gguf` package and compare it with the PEFT
folder; the row order of q/k is checked against the base GGUF itself (its dequantized attn_q /
attn_k equal the Hugging Face weights reordered by the same function). The serving checks start
the real llama-server (xllamacpp) on the embedded Q4_1 GGUF with the converted test adapters: each
must show its behaviour, and scale 0 must give the base model's answer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
from safetensors.torch import load_file

from bench._llamacpp import base_gguf, converted_adapters, llamacpp_spec, lora_field
from bench._servers import free_port, running
from bench.gguf_lora import ConversionError, convert, rope_rows_to_gguf
from tests.conftest import test_cache_root
from tests.support.adapters import ADAPTER_SPECS, HELD_OUT_PROMPTS, is_upper_case

BASE = "smollm2"
LAYERS = 30


@pytest.fixture(scope="module")
def base_file() -> Path:
    return base_gguf(test_cache_root() / "llamacpp")


@pytest.fixture(scope="module")
def gguf_loras(
    test_adapters: dict[str, Path], base_file: Path, tmp_path_factory
) -> dict[str, Path]:
    return converted_adapters(test_adapters, base_file, tmp_path_factory.mktemp("gguf-lora"))


def _fields(reader) -> dict[str, object]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_written_file_matches_the_peft_folder(
    test_adapters: dict[str, Path], gguf_loras: dict[str, Path]
) -> None:
    import torch

    folder = test_adapters["caps"]
    config = json.loads((folder / "adapter_config.json").read_text())
    peft = {
        k: v.to(torch.float32).numpy()
        for k, v in load_file(folder / "adapter_model.safetensors").items()
    }
    reader = gguf.GGUFReader(gguf_loras["caps"])
    meta = _fields(reader)
    assert meta["general.type"] == "adapter"
    assert meta["general.architecture"] == "llama"
    assert meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(float(config["lora_alpha"]))
    rank = config["r"]
    tensors = {t.name: t for t in reader.tensors}
    modules = {"q_proj": ("attn_q", 576, 9), "k_proj": ("attn_k", 192, 3),
               "v_proj": ("attn_v", 192, None), "o_proj": ("attn_output", 576, None)}  # fmt: skip
    expected_names = {
        f"blk.{n}.{gg}.weight.lora_{s}" for n in range(LAYERS) for gg, _, _ in modules.values()
        for s in "ab"
    }  # fmt: skip
    assert set(tensors) == expected_names
    for n in range(LAYERS):
        for module, (name, out, heads) in modules.items():
            prefix = f"base_model.model.model.layers.{n}.self_attn.{module}"
            a, b = (
                tensors[f"blk.{n}.{name}.weight.lora_a"],
                tensors[f"blk.{n}.{name}.weight.lora_b"],
            )
            # ggml's ne, innermost first: A [in, rank], B [rank, out] (llama.cpp's shape check)
            assert list(a.shape) == [576, rank] and list(b.shape) == [rank, out]
            assert a.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(np.asarray(a.data), peft[f"{prefix}.lora_A.weight"])
            peft_b = peft[f"{prefix}.lora_B.weight"]
            want_b = rope_rows_to_gguf(peft_b, heads) if heads else peft_b
            np.testing.assert_array_equal(np.asarray(b.data), want_b)
            if heads:
                assert not np.array_equal(want_b, peft_b)


def test_q_k_row_order_is_the_base_gguf_order(base_file: Path, embedded_model_dir: Path) -> None:
    reader = gguf.GGUFReader(base_file)
    tensors = {t.name: t for t in reader.tensors}
    hf = load_file(embedded_model_dir / "model.safetensors")
    for layer in (0, 17):
        for module, name, heads in (("q_proj", "attn_q", 9), ("k_proj", "attn_k", 3)):
            t = tensors[f"blk.{layer}.{name}.weight"]
            base = gguf.quants.dequantize(t.data, t.tensor_type)
            weight = hf[f"model.layers.{layer}.self_attn.{module}.weight"].float().numpy()
            np.testing.assert_allclose(rope_rows_to_gguf(weight, heads), base, atol=1e-5)


def test_every_problem_is_reported_and_nothing_written(
    test_adapters: dict[str, Path], base_file: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(test_adapters["caps"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(use_dora=True, rank_pattern={"q_proj": 8})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "bad.gguf"
    with pytest.raises(ConversionError) as err:
        convert(folder, base_file, out)
    assert "use_dora" in str(err.value) and "rank_pattern" in str(err.value)
    assert not out.exists()


def _answer(base_url: str, model: str, prompt: str, names: tuple[str, ...], scale=None) -> str:
    lora = lora_field(model, names)
    if scale is not None:
        lora = [{**item, "scale": scale} for item in lora]
    body = {
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 64,
        "temperature": 0.0, "lora": lora,
    }  # fmt: skip
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_llama_server_applies_each_converted_adapter(
    base_file: Path, gguf_loras: dict[str, Path], tmp_path: Path
) -> None:
    names = tuple(gguf_loras)
    prompts = HELD_OUT_PROMPTS[:3]
    port = free_port()
    spec = llamacpp_spec(model=base_file, loras=gguf_loras, port=port, parallel=2)
    with running(spec, port=port, log_path=tmp_path / "llama-server.log") as server:
        base = {p: _answer(server.base_url, BASE, p, names) for p in prompts}
        for name in names:
            check = ADAPTER_SPECS[name].check
            answers = {p: _answer(server.base_url, name, p, names) for p in prompts}
            shown = [p for p, a in answers.items() if check(a)]
            assert len(shown) >= len(prompts) - 1, (name, answers)
            assert not any(ADAPTER_SPECS[name].check(a) for a in base.values()), base
        # the caps adapter's list with its own scale 0 is the base model again
        for p in prompts:
            assert _answer(server.base_url, "caps", p, names, scale=0.0) == base[p]
            assert not is_upper_case(base[p])
