"""bench/lora_ops.py's replay: with base weights, each LoRA call adds to its base layer's product."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm.lora.ops.torch_ops")

from bench import lora_ops  # noqa: E402


def test_replay_with_base_adds_lora_to_the_base_product():
    layers = lora_ops.make_layers(slots=2, rank=4, dtype="float32", with_base=True)[:4]
    assert [tuple(layer.base.shape) for layer in layers] == [
        (960, 576), (576, 576), (3072, 576), (576, 1536),
    ]  # fmt: skip
    impls = lora_ops.implementations()
    indices = lora_ops.row_indices("mixed", 4, slots=2)
    inputs = {s: torch.randn(4, s) for s in (lora_ops.HIDDEN, lora_ops.INTERMEDIATE)}
    base = lora_ops.model_step(impls["harness"], layers, inputs, indices)
    for layer, y in zip(layers, base, strict=True):
        torch.testing.assert_close(y, inputs[layer.base.shape[1]] @ layer.base.T)
    reference = lora_ops.model_step(impls["segmented"], layers, inputs, indices)
    for name in ("loraplex", "loraplex-torch"):
        got = lora_ops.model_step(impls[name], layers, inputs, indices)
        for g, r, b in zip(got, reference, base, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
            assert not torch.equal(g, b)  # the adapters did add something
    times = lora_ops.time_steps(impls, layers, indices, repeats=2)
    assert set(times) == set(impls) and all(t > 0 for t in times.values())
