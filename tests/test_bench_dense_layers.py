"""bench/dense_layers.py: the products of a decode step, from the model's config."""

from __future__ import annotations

from bench.dense_layers import layer_shapes

SMOLLM2_135M = {
    "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 30, "vocab_size": 49152,
}  # fmt: skip


def test_every_product_of_a_decode_step_with_the_lm_head_last():
    shapes = layer_shapes(SMOLLM2_135M)
    assert len(shapes) == 4 * 30 + 1
    assert shapes[:4] == [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576),
                          ("down", 576, 1536)]  # fmt: skip
    assert shapes[-1] == ("lm_head", 49152, 576)
    # 134.5 M parameters: the model's own count (the LM head is the tied embedding)
    assert sum(out * inp for _, out, inp in shapes) == 134_515_008 - 30 * 2 * 576 - 576


def test_without_grouped_query_attention_or_head_dim():
    config = {**SMOLLM2_135M, "num_key_value_heads": 0, "head_dim": None}
    assert layer_shapes(config)[0] == ("qkv", 3 * 576, 576)
