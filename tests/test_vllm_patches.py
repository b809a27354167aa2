"""The CPU LoRA ops that isolate base rows (server.vllm_patches) against vLLM's own ops.

Rows with an adapter slot must match vLLM's result; rows with slot -1 must get exactly nothing
(vLLM's ops give them the last slot's adapter: the defect the patch fixes).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
vllm_ops = pytest.importorskip("vllm.lora.ops.torch_ops")

from server import vllm_patches  # noqa: E402

SLOTS, IN, OUT = 4, 64, 96


def _stack(rank: int, dims: tuple[int, int], dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    return torch.randn(SLOTS, 1, *dims, generator=g).to(dtype)


def _tolerance(dtype):
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [8, 16, 64])
def test_shrink_matches_vllm_and_zeroes_base_rows(dtype, rank):
    indices = torch.tensor([0, -1, 2, 2, -1, 3, 0, 1])
    x = torch.randn(len(indices), IN).to(dtype)
    weights = _stack(rank, (rank, IN), dtype)
    ours = torch.full((len(indices), rank), 7.0)
    theirs = torch.full((len(indices), rank), 7.0)
    vllm_patches.bgmv_shrink(x, weights, ours, indices, 0.5)
    vllm_ops.bgmv_shrink(x, weights, theirs, indices, 0.5)
    adapter_rows = indices >= 0
    torch.testing.assert_close(ours[adapter_rows], theirs[adapter_rows], **_tolerance(dtype))
    assert torch.count_nonzero(ours[~adapter_rows]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_matches_vllm_and_leaves_base_rows_alone(dtype, add_inputs):
    indices = torch.tensor([3, -1, 1, -1, 0, 3])
    x = torch.randn(len(indices), 16, dtype=torch.float32)
    weights = _stack(16, (OUT, 16), dtype)
    start = torch.randn(len(indices), OUT).to(dtype)
    ours, theirs = start.clone(), start.clone()
    vllm_patches.bgmv_expand(x, weights, ours, indices, add_inputs)
    vllm_ops.bgmv_expand(x, weights, theirs, indices, add_inputs)
    rows = indices >= 0
    torch.testing.assert_close(ours[rows], theirs[rows], **_tolerance(dtype))
    expected_base = start[~rows] if add_inputs else torch.zeros_like(start[~rows])
    torch.testing.assert_close(ours[~rows], expected_base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expand_slice_and_prefill_variants(dtype):
    seq_lens = torch.tensor([3, 2, 4])
    seq_slots = torch.tensor([1, -1, 2])
    tokens = int(seq_lens.sum())
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    x = torch.randn(tokens, 16)
    weights = _stack(16, (32, 16), dtype)
    start = torch.randn(tokens, OUT).to(dtype)
    ours, theirs = start.clone(), start.clone()
    args = (starts, seq_lens, seq_slots, 3, 4, tokens, 40, 32, True)
    vllm_patches.sgmv_expand_slice(x, weights, ours, *args)
    vllm_ops.sgmv_expand_slice(x, weights, theirs, *args)
    token_slots = torch.repeat_interleave(seq_slots, seq_lens)
    rows = token_slots >= 0
    torch.testing.assert_close(ours[rows], theirs[rows], **_tolerance(dtype))
    torch.testing.assert_close(ours[~rows], start[~rows])  # base tokens untouched


def test_vllm_ops_show_the_defect_the_patch_fixes():
    """If this fails, vLLM fixed slot -1 upstream and the patch may be retired."""
    indices = torch.tensor([-1])
    weights = _stack(8, (8, IN), torch.float32)
    out = torch.zeros(1, 8)
    vllm_ops.bgmv_shrink(torch.ones(1, IN), weights, out, indices, 1.0)
    assert torch.count_nonzero(out) > 0  # the last slot's adapter applied to a base row


def test_register_only_patches_when_asked(monkeypatch):
    from vllm.lora.punica_wrapper import punica_cpu

    monkeypatch.delenv(vllm_patches.ENV_FLAG, raising=False)
    original = punica_cpu.bgmv_shrink
    vllm_patches.register()
    assert punica_cpu.bgmv_shrink is original
    monkeypatch.setenv(vllm_patches.ENV_FLAG, "1")
    try:
        vllm_patches.register()
        assert punica_cpu.bgmv_shrink is vllm_patches.bgmv_shrink
    finally:
        for name in vllm_patches._PATCHED_FUNCTIONS:
            monkeypatch.setattr(punica_cpu, name, getattr(vllm_ops, name))
        punica_cpu._loraplex_patched = False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [1, 2, 4, 8])
def test_mixed_ranks_and_adapter_counts_through_shrink_and_expand(dtype, slots):
    """A LoRA layer's whole path (shrink into an fp32 buffer, expand into the output) with 1-8
    adapters of ranks 8/16/64 padded into one stack, plus base rows, against vLLM's ops."""
    max_rank = 64
    g = torch.Generator().manual_seed(slots)
    a = torch.zeros(slots, 1, max_rank, IN, dtype=dtype)
    b = torch.zeros(slots, 1, OUT, max_rank, dtype=dtype)
    for slot in range(slots):  # vLLM pads smaller ranks with zeros up to max_lora_rank
        rank = (8, 16, 64)[slot % 3]
        a[slot, 0, :rank] = torch.randn(rank, IN, generator=g).to(dtype)
        b[slot, 0, :, :rank] = torch.randn(OUT, rank, generator=g).to(dtype)
    indices = torch.tensor([i % (slots + 1) - 1 for i in range(3 * slots + 2)])  # -1 included
    x = torch.randn(len(indices), IN, generator=g).to(dtype)
    y0 = torch.randn(len(indices), OUT, generator=g).to(dtype)
    results = []
    for ops in (vllm_patches, vllm_ops):
        buffer = torch.zeros(len(indices), max_rank, dtype=torch.float32)
        y = y0.clone()
        ops.bgmv_shrink(x, a, buffer, indices, 0.5)
        ops.bgmv_expand(buffer, b, y, indices, True)
        results.append(y)
    ours, theirs = results
    rows = indices >= 0
    torch.testing.assert_close(ours[rows], theirs[rows], **_tolerance(dtype))
    torch.testing.assert_close(ours[~rows], y0[~rows])
