"""loraplex's CPU LoRA ops (server.lora_cpu_ops, installed by server.vllm_patches) against
vLLM's own ops.

Rows with an adapter slot must match vLLM's result; rows with slot -1 must get exactly nothing
(vLLM's ops give them the last slot's adapter: the defect the patch fixes).
"""

from __future__ import annotations

import contextlib
import ctypes
import types

import pytest

torch = pytest.importorskip("torch")
vllm_ops = pytest.importorskip("vllm.lora.ops.torch_ops")

from loraplex.hardware import cpu_info  # noqa: E402
from server import frame_stack, lora_cpu_ops, lora_kernel, vllm_patches  # noqa: E402

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
    lora_cpu_ops.bgmv_shrink(x, weights, ours, indices, 0.5)
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
    lora_cpu_ops.bgmv_expand(x, weights, ours, indices, add_inputs)
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
    lora_cpu_ops.sgmv_expand_slice(x, weights, ours, *args)
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
    from vllm.lora import model_manager
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.platforms.cpu import CpuPlatform

    wrapper, manager = punica_cpu.PunicaWrapperCPU, model_manager.LoRAModelManager
    layer_output = BaseLinearLayerWithLoRA.__dict__["_apply_lora_to_output"]
    hook = CpuPlatform.__dict__["check_and_update_config"]
    monkeypatch.setattr(CpuPlatform, "check_and_update_config", hook)
    # Record every attribute register() replaces, so that monkeypatch puts it back afterwards.
    for name in vllm_patches._PATCHED_FUNCTIONS:
        monkeypatch.setattr(punica_cpu, name, getattr(punica_cpu, name))
    for owner, name in ((wrapper, "update_metadata"), (wrapper, "add_lora_linear"),
                        (wrapper, "add_lora_logits"), (wrapper, "add_lora_embedding"),
                        (manager, "activate_adapter"), (manager, "_create_lora_modules"),
                        (BaseLinearLayerWithLoRA, "_apply_lora_to_output")):  # fmt: skip
        monkeypatch.setattr(owner, name, getattr(owner, name))
    monkeypatch.setattr(BaseLinearLayerWithLoRA, "_loraplex_layer", -1, raising=False)
    monkeypatch.setattr(punica_cpu, "_loraplex_patched", False, raising=False)
    # (This process may have been patched already: vLLM loads its plugins in the front end of
    # the in-process test server too.)
    original_shrink, original_linear = punica_cpu.bgmv_shrink, wrapper.add_lora_linear

    monkeypatch.delenv(vllm_patches.ENV_FLAG, raising=False)
    vllm_patches.register()
    assert punica_cpu.bgmv_shrink is original_shrink
    assert wrapper.add_lora_linear is original_linear

    monkeypatch.setenv(vllm_patches.ENV_FLAG, "1")
    monkeypatch.setenv(vllm_patches.ENV_COMPILE, "0")
    vllm_patches.register()
    assert CpuPlatform.__dict__["check_and_update_config"] is hook  # LORAPLEX_COMPILE=0
    monkeypatch.setattr(punica_cpu, "_loraplex_patched", False)
    monkeypatch.setattr(wrapper, "add_lora_linear", original_linear)
    monkeypatch.setattr(BaseLinearLayerWithLoRA, "_apply_lora_to_output", layer_output)
    monkeypatch.delenv(vllm_patches.ENV_COMPILE)
    vllm_patches.register()
    vllm_patches.register()  # idempotent: wrapped once
    assert punica_cpu.bgmv_shrink is lora_cpu_ops.bgmv_shrink
    # the op for the compiled graph around the fused path, around vLLM's own
    assert wrapper.add_lora_linear.__wrapped__.__wrapped__ is original_linear
    assert CpuPlatform.__dict__["check_and_update_config"] is not hook
    # the model's LoRA linear layers: numbered at creation, one op call each in the graph
    assert BaseLinearLayerWithLoRA._apply_lora_to_output.__wrapped__ is layer_output
    assert hasattr(manager._create_lora_modules, "__wrapped__")
    for op in ("lora_layer", "add_lora_linear", "add_lora_embedding"):
        assert hasattr(torch.ops.loraplex, op)
    assert frame_stack.counts() is not None  # patch 4: CPython's frame-stack chunks cached


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
    for ops in (lora_cpu_ops, vllm_ops):
        buffer = torch.zeros(len(indices), max_rank, dtype=torch.float32)
        y = y0.clone()
        ops.bgmv_shrink(x, a, buffer, indices, 0.5)
        ops.bgmv_expand(buffer, b, y, indices, True)
        results.append(y)
    ours, theirs = results
    rows = indices >= 0
    torch.testing.assert_close(ours[rows], theirs[rows], **_tolerance(dtype))
    torch.testing.assert_close(ours[~rows], y0[~rows])


# -- fused layer products ----------------------------------------------------------------------


def _layer_stacks(slots: int, slices: tuple[int, ...], dtype, *, empty=(), seed=0):
    """vLLM-shaped stacks for one LoRA layer: per slice a (slots, 1, 64, IN), b (slots, 1, out,
    64); slot s holds an adapter of rank 8/16/64 (zero-padded to 64), slots in `empty` none."""
    max_rank = 64
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.zeros(slots, 1, max_rank, IN, dtype=dtype) for _ in slices)
    b = tuple(torch.zeros(slots, 1, out, max_rank, dtype=dtype) for out in slices)
    for slot in range(slots):
        if slot in empty:
            continue
        rank = (8, 16, 64)[slot % 3]
        for a_i, b_i, out in zip(a, b, slices, strict=True):
            a_i[slot, 0, :rank] = (torch.randn(rank, IN, generator=g) * 0.3).to(dtype)
            b_i[slot, 0, :, :rank] = (torch.randn(out, rank, generator=g) * 0.3).to(dtype)
    return a, b


def _vllm_layer(y, x, a, b, slices, indices, scale):
    """What vLLM's CPU punica wrapper does for one layer (decode path), with vLLM's ops."""
    buffers = [torch.zeros(x.shape[0], a[0].shape[-2], dtype=torch.float32) for _ in slices]
    for a_i, buf in zip(a, buffers, strict=True):
        vllm_ops.bgmv_shrink(x, a_i, buf, indices, scale)
    offset = 0
    for b_i, buf, size in zip(b, buffers, slices, strict=True):
        vllm_ops.bgmv_expand_slice(buf, b_i, y, indices, offset, size, True)
        offset += size


def _check_fused(indices, *, slots, slices, dtype, scale=1.0, empty=()):
    a, b = _layer_stacks(slots, slices, dtype, empty=empty, seed=slots)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(len(indices), IN, generator=g).to(dtype)
    y0 = torch.randn(len(indices), sum(slices), generator=g).to(dtype)
    ours, theirs = y0.clone(), y0.clone()
    weights = lora_cpu_ops.FusedLoraWeights.build(a, b, slices)
    lora_cpu_ops.apply_fused_lora(ours, x, lora_cpu_ops.StepLayout.of(indices), weights, scale)
    _vllm_layer(theirs, x, a, b, slices, indices, scale)
    rows = indices >= 0
    torch.testing.assert_close(ours[rows], theirs[rows], **_tolerance(dtype))
    assert torch.equal(ours[~rows], y0[~rows])  # base rows: exactly untouched
    return ours, y0


def _without_kernel(monkeypatch):
    monkeypatch.setattr(lora_kernel, "library", lambda: None)


@contextlib.contextmanager
def _bf16_dot(allowed: bool):
    """The kernel with or without AVX512-BF16's dot product (where the CPU has it: without, it
    runs the code other CPUs run), for weights laid out inside the block."""
    library = lora_kernel.library()
    if library is None:
        pytest.fail("the CPU LoRA kernel did not build here (see the log)")
    library.loraplex_allow_bf16_dot(int(allowed))
    try:
        yield
    finally:
        library.loraplex_allow_bf16_dot(1)


@contextlib.contextmanager
def _avx2_only(monkeypatch):
    """The kernel built with its AVX2+FMA code alone (LORAPLEX_LORA_KERNEL_ISA=avx2): the code
    CPUs without AVX-512 run, whatever this one has."""
    if "avx2" not in cpu_info().flags:
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv(lora_kernel.ENV_ISA, "avx2")
    lora_kernel.reset()
    try:
        library = lora_kernel.library()
        assert library is not None and library.loraplex_only_avx2() == 1
        assert library.loraplex_bf16_dot() == 0
        yield
    finally:
        monkeypatch.delenv(lora_kernel.ENV_ISA)
        lora_kernel.reset()


@contextlib.contextmanager
def _kernel_code(monkeypatch, code: str):
    """The kernel's code: "bf16-dot" (AVX512-BF16's dot product where the CPU has it), "fp32"
    (without it, the fp32 arithmetic of other CPUs) or "avx2" (the AVX2+FMA build alone)."""
    if code == "avx2":
        with _avx2_only(monkeypatch):
            yield
    else:
        with _bf16_dot(code == "bf16-dot"):
            yield


@pytest.fixture(
    params=["kernel", "kernel-fp32", "kernel-avx2", "fp32-small-batches", "model-dtype"]
)
def compute_path(request, monkeypatch):
    """Every compute path for every batch: the C kernel (decode-sized batches where it builds;
    `kernel-fp32`: without AVX512-BF16's dot product, as on other CPUs; `kernel-avx2`: its AVX2
    build), torch in fp32 (decode-sized batches without the kernel; per-slice B when mixed) and
    torch in the model's dtype (larger batches)."""
    monkeypatch.setattr(lora_cpu_ops, "KERNEL_ROWS", 10_000)
    monkeypatch.setattr(
        lora_cpu_ops, "SMALL_BATCH_ROWS", 0 if request.param == "model-dtype" else 10_000
    )
    if not request.param.startswith("kernel"):
        _without_kernel(monkeypatch)
        yield request.param
        return
    code = {"kernel": "bf16-dot", "kernel-fp32": "fp32", "kernel-avx2": "avx2"}[request.param]
    with _kernel_code(monkeypatch, code):
        yield request.param


@pytest.fixture(params=["fp32-small-batches", "model-dtype"])
def small_batch_rows(request, monkeypatch):
    """The torch paths (no kernel): fp32 (decode-sized batches) and the model's dtype."""
    _without_kernel(monkeypatch)
    rows = 10_000 if request.param == "fp32-small-batches" else 0
    monkeypatch.setattr(lora_cpu_ops, "SMALL_BATCH_ROWS", rows)
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [1, 2, 4, 8])
@pytest.mark.parametrize("slices", [(OUT,), (OUT, 32, 32)], ids=["one-slice", "qkv"])
def test_fused_layer_matches_vllm_for_1_to_8_adapters_mixed_ranks_and_base_rows(
    dtype, slots, slices, compute_path
):
    indices = torch.tensor([i % (slots + 1) - 1 for i in range(3 * slots + 2)])  # -1 included
    _check_fused(indices, slots=slots, slices=slices, dtype=dtype, scale=0.5)


def test_small_batches_compute_in_fp32_from_fp32_copies(monkeypatch):
    """Without the kernel, a decode-sized batch of a bf16 model takes the fp32 copies (the
    layer's product is the fp32 one, rounded once into y); with the fp32 path off, no copies are
    kept."""
    _without_kernel(monkeypatch)
    slices = (OUT, 32, 32)
    a, b = _layer_stacks(4, slices, torch.bfloat16)
    weights = lora_cpu_ops.FusedLoraWeights.build(a, b, slices)
    small = weights.small
    assert small is not None and small.a.dtype == small.b.dtype == torch.float32
    assert torch.equal(small.a, weights.a.float()) and torch.equal(small.b, weights.b.float())
    assert [tuple(p.shape) for p in small.b_slices] == [(4, weights.rank, n) for n in slices]
    indices = torch.tensor([0, 1, 2, 3, -1, 2])
    x = torch.randn(len(indices), IN).to(torch.bfloat16)
    y = torch.zeros(len(indices), sum(slices), dtype=torch.bfloat16)
    lora_cpu_ops.apply_fused_lora(y, x, lora_cpu_ops.StepLayout.of(indices), weights)
    expected = torch.zeros(len(indices), sum(slices))
    for row, slot in enumerate(indices.tolist()):
        if slot >= 0:
            expected[row] = x[row].float() @ small.a[slot].T @ small.b[slot]
    torch.testing.assert_close(y.float(), expected, rtol=8e-3, atol=1e-3)  # bf16's rounding
    monkeypatch.setattr(lora_cpu_ops, "SMALL_BATCH_ROWS", 0)
    assert lora_cpu_ops.FusedLoraWeights.build(a, b, slices).small is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layer_one_adapter_for_the_whole_batch(dtype, compute_path):
    indices = torch.full((6,), 2)
    _check_fused(indices, slots=4, slices=(OUT, 32, 32), dtype=dtype)


def test_fused_layer_few_slots_in_use_of_a_large_stack(compute_path):
    """Two adapters in use of 8 slots: below ALL_SLOTS_MIN_SHARE, the slots in use are gathered."""
    indices = torch.tensor([5, -1, 1, 5, 1, -1, 1])
    assert 2 < lora_cpu_ops.ALL_SLOTS_MIN_SHARE * 8
    _check_fused(indices, slots=8, slices=(OUT, 32, 32), dtype=torch.bfloat16)


def test_gathered_slots_are_kept_until_the_weights_change(small_batch_rows):
    """Two adapters in slots 1 and 6 of 8: their weights are copied together once and reused by
    the next steps; a refresh (an adapter written into a slot) starts over, with the new weights."""
    slices = (OUT, 32, 32)
    a, b = _layer_stacks(8, slices, torch.bfloat16)
    weights = lora_cpu_ops.FusedLoraWeights.build(a, b, slices)
    layout = lora_cpu_ops.StepLayout.of(torch.tensor([1, 6, -1, 6]))
    x = torch.randn(4, IN).to(torch.bfloat16)
    y = torch.zeros(4, sum(slices), dtype=torch.bfloat16)
    lora_cpu_ops.apply_fused_lora(y, x, layout, weights)
    ((key, kept),) = weights.gathered.items()
    assert key == ((1, 6), bool(small_batch_rows))
    lora_cpu_ops.apply_fused_lora(y, x, layout, weights)
    assert weights.gathered[key] is kept  # the next step copies nothing
    for stack in (*a, *b):
        stack[6] = stack[0]  # another adapter activated in slot 6
    refreshed = weights.refresh([6], a, b, slices)
    assert refreshed.gathered == {}
    ours, theirs = torch.zeros_like(y), torch.zeros_like(y)
    lora_cpu_ops.apply_fused_lora(ours, x, layout, refreshed)
    lora_cpu_ops.apply_fused_lora(
        theirs, x, layout, lora_cpu_ops.FusedLoraWeights.build(a, b, slices)
    )
    torch.testing.assert_close(ours, theirs)


def test_fused_layer_computes_over_the_span_of_slots_in_use(compute_path):
    """Slots 2-4 in use of 8 (slot 3 by base rows only): the product runs over that span, a view
    of the stacks, not over all 8 slots."""
    indices = torch.tensor([2, -1, 4, 2, 4, -1, 2])
    assert 2 >= lora_cpu_ops.ALL_SLOTS_MIN_SHARE * 3
    _check_fused(indices, slots=8, slices=(OUT, 32, 32), dtype=torch.bfloat16)


def test_fused_layer_prefill_rows_one_per_token(compute_path):
    """Prefill: rows are tokens, several per sequence, sequences on different adapters."""
    indices = torch.repeat_interleave(torch.tensor([1, -1, 0, 3]), torch.tensor([5, 3, 7, 2]))
    _check_fused(indices, slots=4, slices=(OUT, 32, 32), dtype=torch.bfloat16)


def test_fused_layer_skips_adapters_without_weights_for_it(compute_path):
    """An adapter that does not target this module has zero weights here: the layer is left as
    it is (the same as adding zero, without computing it)."""
    indices = torch.tensor([0, 2, 0, 2])
    a, b = _layer_stacks(4, (OUT,), torch.bfloat16, empty=(0, 2))
    weights = lora_cpu_ops.FusedLoraWeights.build(a, b, (OUT,))
    assert weights.nonzero == {1, 3}
    y = torch.randn(4, OUT).to(torch.bfloat16)
    before = y.clone()
    lora_cpu_ops.apply_fused_lora(
        y, torch.randn(4, IN), lora_cpu_ops.StepLayout.of(indices), weights
    )
    assert torch.equal(y, before)
    # and mixed with an adapter that has weights, the others' rows stay exact
    _check_fused(torch.tensor([0, 1, 2, 3, -1]), slots=4, slices=(OUT,), dtype=torch.float32,
                 empty=(0, 2))  # fmt: skip


# -- the C kernel ---------------------------------------------------------------------------------


@pytest.fixture(params=["bf16-dot", "fp32", "avx2"])
def kernel_on(request, monkeypatch):
    """The kernel for every batch, with and without AVX512-BF16's dot product (the same where
    the CPU does not have it), and built with its AVX2 code alone."""
    monkeypatch.setattr(lora_cpu_ops, "KERNEL_ROWS", 10_000)
    with _kernel_code(monkeypatch, request.param):
        yield request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_reads_the_models_a_and_a_compact_fp32_b(dtype, kernel_on):
    """The kernel multiplies the fused A itself (no copy) and B with the blocks of the block-
    diagonal B side by side (fp32); a refresh rewrites both for the slot, in place."""
    slices = (OUT, 32, 32)
    a, b = _layer_stacks(4, slices, dtype, empty=(2,))
    weights = lora_cpu_ops.FusedLoraWeights.build(a, b, slices)
    kernel = weights.kernel
    assert kernel is not None and weights.small is None
    assert kernel.a is weights.a
    pairs = dtype == torch.bfloat16 and bool(lora_kernel.library().loraplex_bf16_dot())
    assert kernel.b.dtype == (torch.bfloat16 if pairs else torch.float32)
    rank, offset = weights.rank, 0
    for i, size in enumerate(slices):
        block = weights.b[:, i * rank : (i + 1) * rank, offset : offset + size]
        assert torch.equal(kernel.compact_b()[:, :, offset : offset + size], block.float())
        offset += size
    assert kernel.live.tolist() == [1, 1, 0, 1] and kernel.offsets.tolist() == [0, 96, 128, 160]
    assert kernel.ranks.tolist() == [8, 16, 0, 8]  # each slot's own, below the fused rank 16
    for stack in (*a, *b):
        stack[2], stack[0] = stack[1], 0  # an adapter into slot 2; slot 0 emptied
    refreshed = weights.refresh([0, 2], a, b, slices)
    assert refreshed.kernel is kernel and kernel.live.tolist() == [0, 1, 1, 1]
    assert kernel.ranks.tolist() == [0, 16, 16, 8]
    assert torch.equal(kernel.b[2], kernel.b[1]) and not kernel.b[0].any()
    assert kernel.compact_b().shape == (4, rank, sum(slices))
    _check_fused(torch.tensor([0, 2, 1, -1]), slots=4, slices=slices, dtype=dtype)


@pytest.mark.parametrize("in_features", [64, 70, 7])
@pytest.mark.parametrize("rank", [1, 5, 16])
def test_kernel_odd_sizes(in_features, rank, kernel_on):
    """Input sizes and ranks that are not multiples of the kernel's vector widths (32 bf16, 16
    fp32 values, blocks of 4 A rows, 64 output columns): the tails must be right too."""
    slices, slots = (OUT, 70, 3), 3
    g = torch.Generator().manual_seed(rank)
    a = tuple(torch.zeros(slots, 1, 16, in_features) for _ in slices)
    b = tuple(torch.zeros(slots, 1, out, 16) for out in slices)
    for slot in range(slots):
        for a_i, b_i in zip(a, b, strict=True):
            a_i[slot, 0, :rank] = torch.randn(rank, in_features, generator=g) * 0.3
            b_i[slot, 0, :, :rank] = torch.randn(b_i.shape[2], rank, generator=g) * 0.3
    indices = torch.tensor([2, 0, -1, 2, 1])
    for dtype in (torch.float32, torch.bfloat16):
        a_d, b_d = tuple(t.to(dtype) for t in a), tuple(t.to(dtype) for t in b)
        x = torch.randn(len(indices), in_features, generator=g).to(dtype)
        y0 = torch.randn(len(indices), sum(slices) + 5, generator=g).to(dtype)  # wider than out
        ours = y0.clone()
        weights = lora_cpu_ops.FusedLoraWeights.build(a_d, b_d, slices)
        assert weights.kernel is not None
        lora_cpu_ops.apply_fused_lora(ours, x, lora_cpu_ops.StepLayout.of(indices), weights)
        expected = y0.double()  # exact from the same (rounded) inputs
        for row, slot in enumerate(indices.tolist()):
            if slot < 0:
                continue
            offset = 0
            for a_i, b_i, size in zip(a_d, b_d, slices, strict=True):
                h = x[row].double() @ a_i[slot, 0].double().T
                expected[row, offset : offset + size] += h @ b_i[slot, 0].double().T
                offset += size
        # bf16: the rank-r intermediate rounded to bf16 (as vLLM's expand step does, where the
        # CPU has AVX512-BF16) and the sum's one rounding into y
        fp32 = dtype == torch.float32
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5 if fp32 else 1e-2,
                                   atol=1e-4 if fp32 else 3e-2)  # fmt: skip
        assert torch.equal(ours[indices < 0], y0[indices < 0])
        assert torch.equal(ours[:, -5:], y0[:, -5:])


def test_kernel_gives_the_same_bits_on_one_thread_and_on_two(kernel_on):
    """Big enough to be split over torch's threads: each output is computed by the same code
    whichever thread takes it, so the result does not depend on the thread count."""
    slices = (OUT, 32, 32)
    a, b = _layer_stacks(8, slices, torch.bfloat16)
    weights = lora_cpu_ops.FusedLoraWeights.build(a, b, slices)
    indices = torch.tensor([i % 9 - 1 for i in range(16)])
    x = torch.randn(len(indices), IN).to(torch.bfloat16)
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = torch.zeros(len(indices), sum(slices), dtype=torch.bfloat16)
            lora_cpu_ops.apply_fused_lora(y, x, lora_cpu_ops.StepLayout.of(indices), weights)
            results.append(y)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and results[0].any()


def test_kernel_not_taken_for_tensors_it_does_not_handle(kernel_on):
    """fp16, or x in another dtype than y: the torch path, with the same result."""
    slices = (OUT,)
    a, b = _layer_stacks(2, slices, torch.float32)
    weights = lora_cpu_ops.FusedLoraWeights.build(a, b, slices)
    layout = lora_cpu_ops.StepLayout.of(torch.tensor([0, 1, -1]))
    y = torch.zeros(3, OUT, dtype=torch.float16)
    assert not weights.kernel.apply(y, torch.randn(3, IN).half(), layout, 1.0)
    assert not weights.kernel.apply(torch.zeros(3, OUT), torch.randn(3, IN).half(), layout, 1.0)
    assert not y.any()


def test_kernel_builds_once_per_source_and_can_be_switched_off(tmp_path, monkeypatch):
    built = lora_kernel.build(tmp_path)
    assert built.parent == tmp_path and built.name.startswith("lora_kernel-")
    stamp = built.stat().st_mtime_ns
    assert lora_kernel.build(tmp_path) == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no leftovers
    monkeypatch.setenv(lora_kernel.ENV_SWITCH, "0")
    lora_kernel.reset()
    try:
        assert lora_kernel.library() is None
        a, b = _layer_stacks(2, (OUT,), torch.float32)
        assert lora_cpu_ops.FusedLoraWeights.build(a, b, (OUT,)).kernel is None
    finally:
        monkeypatch.delenv(lora_kernel.ENV_SWITCH)
        lora_kernel.reset()


def test_kernel_called_through_python_or_ctypes_gives_the_same_bits(tmp_path, monkeypatch):
    """Where Python's headers are there, the library is also an extension module and the
    per-layer call skips ctypes; without them it is called through ctypes. Same bits either way,
    and a wrong call is a Python error, not a crash."""
    slices = (OUT, 32, 32)
    a, b = _layer_stacks(4, slices, torch.bfloat16)
    indices = torch.tensor([2, 0, -1, 2, 1, 1])
    x = torch.randn(len(indices), IN).to(torch.bfloat16)
    results, entries = [], []
    monkeypatch.setenv(lora_kernel.ENV_DIR, str(tmp_path))
    try:
        for headers in (True, False):
            if not headers:
                monkeypatch.setattr(lora_kernel, "_python_flags", list)
            lora_kernel.reset()
            entries.append(lora_kernel.rows_call())
            weights = lora_cpu_ops.FusedLoraWeights.build(a, b, slices)
            y = torch.zeros(len(indices), sum(slices), dtype=torch.bfloat16)
            assert weights.kernel.apply(y, x, lora_cpu_ops.StepLayout.of(indices), 1.0)
            results.append(y)
    finally:
        lora_kernel.reset()
    assert torch.equal(results[0], results[1]) and results[0].any()
    assert isinstance(entries[1], ctypes._CFuncPtr)  # no headers: ctypes
    assert len(list(tmp_path.glob("lora_kernel-*.so"))) == 2  # one build per kind
    if lora_kernel._python_flags():  # this machine has the headers: the extension's entry
        assert type(entries[0]).__name__ == "builtin_function_or_method"
        with pytest.raises(TypeError, match="9 arguments"):
            entries[0](1, 2, 3)


def test_kernel_bf16_dot_can_be_switched_off(monkeypatch):
    """LORAPLEX_LORA_KERNEL_BF16_DOT=0: fp32 arithmetic even on a CPU with AVX512-BF16 (the
    bf16 weights' B then kept in fp32), read when the kernel loads."""
    monkeypatch.setenv(lora_kernel.ENV_BF16_DOT, "0")
    lora_kernel.reset()
    try:
        assert lora_kernel.library().loraplex_bf16_dot() == 0
        a, b = _layer_stacks(2, (OUT,), torch.bfloat16)
        weights = lora_cpu_ops.FusedLoraWeights.build(a, b, (OUT,))
        assert weights.kernel.b.dtype == torch.float32 and weights.kernel.layer.b_pairs == 0
    finally:
        monkeypatch.delenv(lora_kernel.ENV_BF16_DOT)
        lora_kernel.reset()
        lora_kernel.library()  # loaded again: the dot product allowed again


def test_kernel_isa_avx2_is_a_build_of_its_own_and_other_levels_are_refused(
    tmp_path, monkeypatch, caplog
):
    """LORAPLEX_LORA_KERNEL_ISA=avx2 builds a second library beside the usual one (its name
    carries the flag); a level the kernel has no build for leaves the kernel off, said in the
    log, and LoRA in torch."""
    monkeypatch.setenv(lora_kernel.ENV_DIR, str(tmp_path))
    try:
        for isa in ("", "avx2"):
            monkeypatch.setenv(lora_kernel.ENV_ISA, isa)
            lora_kernel.reset()
            assert lora_kernel.library().loraplex_only_avx2() == int(isa == "avx2")
        assert len(list(tmp_path.glob("lora_kernel-*.so"))) == 2
        monkeypatch.setenv(lora_kernel.ENV_ISA, "avx512")
        lora_kernel.reset()
        with caplog.at_level("WARNING", logger=lora_kernel.__name__):
            assert lora_kernel.library() is None
        assert "the only level is avx2" in caplog.text
    finally:
        monkeypatch.delenv(lora_kernel.ENV_ISA)
        lora_kernel.reset()


def test_kernel_missing_compiler_means_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(lora_kernel.ENV_DIR, str(tmp_path))
    lora_kernel.reset()
    try:
        assert lora_kernel.library() is None
    finally:
        lora_kernel.reset()


def test_step_layout():
    layout = lora_cpu_ops.StepLayout.of(torch.tensor([2, -1, 2, 0]))
    assert (layout.rows, layout.present, layout.uniform) == (4, (0, 2), None)
    assert lora_cpu_ops.StepLayout.of(torch.tensor([3, 3])).uniform == 3
    assert lora_cpu_ops.StepLayout.of(torch.tensor([3, -1])).uniform is None
    assert lora_cpu_ops.StepLayout.of(torch.tensor([-1, -1])).present == ()
    mask = layout.mask((0, 1, 2), torch.float32)
    assert mask.tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 1], [1, 0, 0]]
    assert layout.mask((0, 1, 2), torch.float32) is mask  # computed once per step


class _Wrapper:
    """Stands in for vLLM's PunicaWrapperCPU: the patched methods read only the step layout."""

    def __init__(self, indices):
        self._loraplex_layout = lora_cpu_ops.StepLayout.of(indices)
        self.fallback_calls = 0


class _Manager:
    """Stands in for vLLM's LoRAModelManager: which adapter id sits in which slot."""

    def __init__(self, slots):
        self.lora_index_to_id = [None] * slots

    def activate(self, lora_id, slot):  # what vLLM's activate_adapter does, minus the weights
        if lora_id in self.lora_index_to_id:
            return False
        self.lora_index_to_id[slot] = lora_id
        return True


def test_patched_add_lora_linear_refreshes_fused_weights_for_the_slot_activated():
    def per_op_path(self, y, x, *args, **kwargs):
        self.fallback_calls += 1

    add_lora_linear = vllm_patches._fused_add_lora_linear(per_op_path)
    manager = _Manager(2)
    activate = vllm_patches._recording_writes(lambda self, lora_id: self.activate(lora_id, 0))
    slices = (OUT, 32, 32)
    a, b = _layer_stacks(2, slices, torch.float32)
    wrapper = _Wrapper(torch.tensor([0, 1, -1]))
    x = torch.randn(3, IN)

    def run():
        y = torch.zeros(3, sum(slices))
        add_lora_linear(wrapper, y, x, a, b, 1.0, slices)
        return y, wrapper._loraplex_fused[id(a[0])].fused

    first, cached = run()
    again, same = run()
    assert torch.equal(again, first) and same is cached
    assert activate(manager, 7) is True  # vLLM writes adapter 7 into slot 0 ...
    for stack in (*a, *b):
        stack[0] *= 2
    assert activate(manager, 7) is False  # ... and is asked again every step: nothing written
    second, refreshed = run()
    torch.testing.assert_close(second[0], first[0] * 4)  # A and B doubled
    torch.testing.assert_close(second[1], first[1])
    assert torch.count_nonzero(second[2]) == 0
    fresh = lora_cpu_ops.FusedLoraWeights.build(a, b, slices)
    assert torch.equal(refreshed.a, fresh.a) and torch.equal(refreshed.b, fresh.b)
    assert refreshed.nonzero == fresh.nonzero == {0, 1}

    wrapper._loraplex_layout = lora_cpu_ops.StepLayout.of(torch.tensor([0, 1]))  # 2 rows != 3
    add_lora_linear(wrapper, torch.zeros(3, sum(slices)), x, a, b, 1.0, slices)
    assert wrapper.fallback_calls == 1


def test_fused_weights_refresh_a_slot(monkeypatch):
    """An adapter replaced in one slot: refreshed in place; a larger rank or a layer that had no
    weights at all takes a full build; a slot emptied leaves `nonzero`. (The torch path's fp32
    copies; test_kernel_reads_the_models_a_and_a_compact_fp32_b has the kernel's.)"""
    _without_kernel(monkeypatch)
    slices = (OUT, 32, 32)
    a, b = _layer_stacks(3, slices, torch.bfloat16, empty=(2,))  # ranks 8, 16, -
    fused = lora_cpu_ops.FusedLoraWeights.build(a, b, slices)
    assert fused.rank == 16 and fused.nonzero == {0, 1}
    for stack in (*a, *b):
        stack[0] = stack[1]  # slot 0 now holds slot 1's rank-16 adapter
        stack[1] = 0  # slot 1 emptied
    refreshed = fused.refresh([0, 1], a, b, slices)
    rebuilt = lora_cpu_ops.FusedLoraWeights.build(a, b, slices)
    assert refreshed.a is fused.a  # in place
    assert torch.equal(refreshed.a, rebuilt.a) and torch.equal(refreshed.b, rebuilt.b)
    assert refreshed.small is fused.small  # the fp32 copies too
    for ours, theirs in zip(_small_tensors(refreshed), _small_tensors(rebuilt), strict=True):
        assert torch.equal(ours, theirs)
    assert refreshed.nonzero == rebuilt.nonzero == {0}
    bigger_a, bigger_b = _layer_stacks(3, slices, torch.bfloat16)  # slot 2: rank 64
    grown = refreshed.refresh([2], bigger_a, bigger_b, slices)
    assert grown.rank == 64 and grown.a is not fused.a
    empty = lora_cpu_ops.FusedLoraWeights.build(*_layer_stacks(3, (OUT,), torch.float32,
                                                                empty=(0, 1, 2)), (OUT,))  # fmt: skip
    assert empty.rank == 0 and empty.a.numel() == 0 and not empty.nonzero
    still_empty = empty.refresh([1], *_layer_stacks(3, (OUT,), torch.float32, empty=(0, 1, 2)),
                                (OUT,))  # fmt: skip
    assert still_empty.rank == 0 and not still_empty.nonzero


def _small_tensors(fused):
    return (fused.small.a, fused.small.b, *fused.small.b_slices)


def test_fused_weights_keep_only_the_ranks_in_use():
    """Stacks padded to rank 64 holding rank-8 and rank-16 adapters fuse at rank 16, same result."""
    a, b = _layer_stacks(2, (OUT, 32, 32), torch.float32)  # slot 0: rank 8, slot 1: rank 16
    weights = lora_cpu_ops.FusedLoraWeights.build(a, b, (OUT, 32, 32))
    assert weights.a.shape == (2, 3 * 16, IN) and weights.b.shape == (2, 3 * 16, OUT + 64)
    _check_fused(torch.tensor([0, 1, -1, 1]), slots=2, slices=(OUT, 32, 32), dtype=torch.float32)


def test_patched_lm_head_lora_fused_and_skipped_without_weights():
    """add_lora_logits: rows are sequences (sampler indices); the same result as vLLM's ops on
    adapter rows, base rows untouched, nothing computed when no adapter targets the LM head."""
    vocab = 200
    a, b = _layer_stacks(4, (vocab,), torch.float32, empty=(2,))
    indices = torch.tensor([0, -1, 3, 1, 2])
    wrapper = _Wrapper(torch.tensor([0, 0, -1]))  # token layout: not the one used here
    wrapper._loraplex_sampler_layout = lora_cpu_ops.StepLayout.of(indices)
    wrapper.sampler_indices = indices
    x, y0 = torch.randn(5, IN), torch.randn(5, vocab)

    def vllm_logits(self, y, x, a, b, scale, *, buffer=None, **kwargs):
        buffer = torch.zeros(x.shape[0], a.shape[-2])
        vllm_ops.bgmv_shrink(x, a, buffer, self.sampler_indices, scale)
        vllm_ops.bgmv_expand(buffer, b, y, self.sampler_indices, add_inputs=True)

    ours, theirs = y0.clone(), y0.clone()
    vllm_patches._fused_add_lora_logits(vllm_logits)(wrapper, ours, x, a[0], b[0], 1.0)
    vllm_logits(wrapper, theirs, x, a[0], b[0], 1.0)
    rows = indices >= 0
    torch.testing.assert_close(ours[rows], theirs[rows], **_tolerance(torch.float32))
    assert torch.equal(ours[~rows], y0[~rows])

    wrapper._loraplex_sampler_layout = lora_cpu_ops.StepLayout.of(torch.tensor([2, 2, -1, 2, 2]))
    untouched = y0.clone()
    vllm_patches._fused_add_lora_logits(vllm_logits)(wrapper, untouched, x, a[0], b[0], 1.0)
    assert torch.equal(untouched, y0)  # slot 2 has no LM-head weights


def test_patched_embedding_lora_skipped_when_no_adapter_has_weights_for_it():
    calls = []
    add_lora_embedding = vllm_patches._skipping_add_lora_embedding(
        lambda self, y, x, b, **kwargs: calls.append(kwargs)
    )
    b = torch.zeros(4, 1, 32, 8)
    b[1] = 1.0
    wrapper = _Wrapper(torch.tensor([0, 2, -1]))
    add_lora_embedding(wrapper, None, None, b, add_input=True)
    assert calls == []
    wrapper._loraplex_layout = lora_cpu_ops.StepLayout.of(torch.tensor([0, 1]))
    add_lora_embedding(wrapper, None, None, b, add_input=True)
    assert calls == [{"add_input": True}]


def test_a_failing_fused_path_falls_back_instead_of_failing_the_step(monkeypatch):
    """A defect in the fast path must cost speed, not the engine: the per-op path answers."""

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(lora_cpu_ops, "apply_fused_lora", broken)
    monkeypatch.setattr(lora_cpu_ops.KernelWeights, "apply", broken)  # decode steps' shortcut
    calls = []
    add_lora_linear = vllm_patches._fused_add_lora_linear(lambda *a, **k: calls.append(a))
    a, b = _layer_stacks(2, (OUT,), torch.float32)
    before = vllm_patches.fallback_calls
    add_lora_linear(_Wrapper(torch.tensor([0, 1])), torch.zeros(2, OUT), torch.randn(2, IN), a, b,
                    1.0, (OUT,))  # fmt: skip
    assert len(calls) == 1 and vllm_patches.fallback_calls == before + 1


def _layer_op_state(monkeypatch, indices, layers):
    """vllm_patches' module state as the engine has it after vLLM set a batch's adapters: the
    wrapper, its layout, its numbered layers, no plan yet. The per-op path (`per_op`) counts."""
    per_op = []
    wrapper = _Wrapper(indices)
    wrapper._loraplex_layers = layers
    monkeypatch.setattr(vllm_patches, "_wrapper", wrapper)
    monkeypatch.setattr(vllm_patches, "_layout", wrapper._loraplex_layout)
    monkeypatch.setattr(vllm_patches, "_plan", None)
    monkeypatch.setattr(vllm_patches, "_plans", {})
    fused = vllm_patches._fused_add_lora_linear(lambda *args, **kwargs: per_op.append(args))
    monkeypatch.setattr(vllm_patches, "_fused_linear", fused)
    vllm_patches._register_ops()
    return wrapper, per_op


def _lora_layer(slots, slices, dtype, **kwargs):
    """Stands in for a vLLM LoRA linear layer: what `loraplex::lora_layer` reads of it."""
    a, b = _layer_stacks(slots, slices, dtype, **kwargs)
    return types.SimpleNamespace(lora_a_stacked=a, lora_b_stacked=b, output_slices=slices)


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_layer_op_plans_each_layer_once_per_layout(monkeypatch, path, dtype):
    """`loraplex::lora_layer` (the compiled graph's call per LoRA linear layer): the same result
    as vLLM's ops; nothing done for a layer no adapter of the batch has weights for, nor on a
    base-only batch; the plan is made once per layout and remade after an adapter activation."""
    if path == "torch":
        monkeypatch.setattr(lora_cpu_ops, "KERNEL_ROWS", 0)
    slices = (OUT, 32, 32)
    targeted = _lora_layer(3, slices, dtype)  # slots 0, 1, 2: ranks 8, 16, 64
    untargeted = _lora_layer(3, (OUT,), dtype, empty=(0, 1, 2))  # an MLP layer, say
    indices = torch.tensor([1, -1, 0, 1])
    wrapper, per_op = _layer_op_state(monkeypatch, indices, [targeted, untargeted])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, IN, generator=g).to(dtype)
    y0 = torch.randn(4, sum(slices), generator=g).to(dtype)

    def run(layer, y):
        torch.ops.loraplex.lora_layer(y, x, layer)
        return y

    ours, theirs = run(0, y0.clone()), y0.clone()
    _vllm_layer(theirs, x, targeted.lora_a_stacked, targeted.lora_b_stacked, slices, indices, 1.0)
    rows = indices >= 0
    torch.testing.assert_close(ours[rows], theirs[rows], **_tolerance(dtype))
    assert torch.equal(ours[~rows], y0[~rows])
    plan = vllm_patches._plan
    assert plan[1] is None  # no slot holds weights for the untargeted layer
    assert plan[0] is not None
    y1 = y0[:, :OUT].clone()
    assert torch.equal(run(1, y1), y0[:, :OUT])
    assert torch.equal(run(0, y0.clone()), ours) and vllm_patches._plan is plan  # planned once

    # An adapter activation (vLLM writes slot 0): the next call plans again, with the weights
    # as they are now.
    manager = _Manager(3)
    activate = vllm_patches._recording_writes(lambda self, lora_id: self.activate(lora_id, 0))
    for stack in (*targeted.lora_a_stacked, *targeted.lora_b_stacked):
        stack[0] *= 2
    assert activate(manager, 9) is True and vllm_patches._plan is None
    again = run(0, y0.clone())
    expected = y0.clone()
    _vllm_layer(expected, x, targeted.lora_a_stacked, targeted.lora_b_stacked, slices, indices,
                1.0)  # fmt: skip
    torch.testing.assert_close(again[rows], expected[rows], **_tolerance(dtype))

    # A base-only batch: nothing done for any layer.
    base = lora_cpu_ops.StepLayout.of(torch.tensor([-1, -1, -1, -1]))
    monkeypatch.setattr(vllm_patches, "_layout", base)
    monkeypatch.setattr(vllm_patches, "_plan", None)
    assert torch.equal(run(0, y0.clone()), y0)
    assert vllm_patches._plan == (None, None)
    assert per_op == [] and wrapper.fallback_calls == 0


def test_lora_layer_op_takes_what_the_kernel_declines_to_the_fused_path(monkeypatch):
    """A kernel-sized batch whose x the kernel does not take (not contiguous in its last
    dimension, or rows other than the layout's): the fused path answers, with the same result."""
    slices = (OUT,)
    layer = _lora_layer(2, slices, torch.float32)
    indices = torch.tensor([0, 1, -1])
    _, per_op = _layer_op_state(monkeypatch, indices, [layer])
    x = torch.randn(IN, 3).t()  # (3, IN), stride (1, 3)
    ours, theirs = torch.zeros(3, OUT), torch.zeros(3, OUT)
    torch.ops.loraplex.lora_layer(ours, x, 0)
    _vllm_layer(theirs, x.contiguous(), layer.lora_a_stacked, layer.lora_b_stacked, slices,
                indices, 1.0)  # fmt: skip
    torch.testing.assert_close(ours[:2], theirs[:2], **_tolerance(torch.float32))
    assert torch.count_nonzero(ours[2]) == 0 and per_op == []
    torch.ops.loraplex.lora_layer(torch.zeros(2, OUT), x[:2].contiguous(), 0)  # 2 rows, not 3
    assert len(per_op) == 1  # the fused path's own fallback: vLLM's per-op path, isolated


def test_lora_layers_numbered_in_module_order_where_the_model_has_one_wrapper():
    """`_create_lora_modules`, patched: every LoRA linear layer gets its number for
    `loraplex::lora_layer`, from 0 in module order; a model with several punica wrappers (each
    with its own batch layout) keeps vLLM's calls through `loraplex::add_lora_linear`."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    def layer(wrapper):
        module = BaseLinearLayerWithLoRA.__new__(BaseLinearLayerWithLoRA)  # no weights needed
        module.punica_wrapper = wrapper
        return module

    create = vllm_patches._numbering_layers(lambda self: "created")
    wrapper = types.SimpleNamespace()
    modules = {"qkv": layer(wrapper), "embedding": object(), "o": layer(wrapper)}
    assert create(types.SimpleNamespace(modules=modules)) == "created"
    assert wrapper._loraplex_layers == [modules["qkv"], modules["o"]]
    assert [m._loraplex_layer for m in wrapper._loraplex_layers] == [0, 1]

    text, vision = types.SimpleNamespace(), types.SimpleNamespace()
    modules = {"text": layer(text), "vision": layer(vision)}
    create(types.SimpleNamespace(modules=modules))
    assert not any("_loraplex_layer" in vars(m) for m in modules.values())
    assert not hasattr(text, "_loraplex_layers")
