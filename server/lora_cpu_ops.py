"""LoRA arithmetic for batches that mix adapters, on CPU, in plain torch.

Two kinds of operation live here; `server.vllm_patches` installs them in vLLM's CPU engine.

Per-op replacements (`bgmv_*`, `sgmv_*`): the same contract as vLLM's torch ops of the CPU
punica wrapper, but rows are grouped by adapter slot (one matmul per adapter present) and rows
without an adapter (slot -1) get exactly zero. vLLM's own ops index the weight stack with -1,
which Python reads as "the last slot".

Fused layer products (`FusedLoraWeights`, `apply_fused_lora`): what a whole LoRA-wrapped linear
layer adds to its output, for every slice at once (q, k and v of a fused qkv projection are three
slices), in a fixed handful of torch calls whatever the mix of adapters:

    h     = x @ A^T        A: every slice's A of the slots in use, concatenated
    h    *= slot mask      keeps each row's own adapter's rank-r part; zero for base rows
    delta = h @ B          B: block-diagonal over slices, so each slice lands in its own columns
    y    += delta

On CPU the arithmetic of a rank-16 adapter is a few percent of the base layer's; what costs is
the number of small calls (vLLM's path makes 2 per slice, each gathering a weight matrix per row).
A layer whose weights are zero for every adapter in the batch (an adapter that does not target
that module) is skipped outright.

Decode-sized batches (at most `KERNEL_ROWS` rows) take one call of a C kernel per layer
(`server.lora_kernel`, `KernelWeights`): inside vLLM's model run each small torch call costs
several microseconds of dispatch, and a layer's LoRA in torch is four to six of them for a few
microseconds of arithmetic. The kernel groups rows by adapter, reads the model's own A (bf16 on
CPUs with native bf16: half the bytes of an fp32 copy) and a compact B (bf16 in rank pairs for
AVX512-BF16's dot product, else fp32), computes in fp32 and rounds once into y. Where the kernel
cannot be built (no C compiler) or is switched off (LORAPLEX_LORA_KERNEL=0), batches of at most
`SMALL_BATCH_ROWS` rows compute in torch in fp32 from fp32 copies of the fused weights
(`SmallBatchWeights`): on CPUs with native bf16 a bf16 matmul this small costs ~25 us of fixed
overhead (oneDNN) against ~5 us in fp32, and a mixed batch multiplies each slice's B separately
(dense, slots x rank rows) instead of the block-diagonal B. Larger batches (prefill) keep torch
in the model's dtype, where bf16's throughput wins. bench/lora_ops.py and bench/lora_cpu.py
measure every path.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch  # noqa: TID253 - runs inside vLLM's engine processes, which have torch loaded

from server import lora_kernel

# Compute over the span of slots from the first to the last in use (one product, a view) while at
# least this share of the span is in use; below it, gather the slots in use first (the gather
# copies weights, but saves reading and multiplying those of idle slots when max_loras is large).
ALL_SLOTS_MIN_SHARE = 0.5

# Batches of at most this many rows take the C kernel where it is there (decode steps, and mixed
# decode + short prefill steps): measured faster than torch's bf16 product up to 64 rows even
# replayed alone, where torch's per-call cost is lowest (bench/README.md); 0 turns it off.
KERNEL_ROWS = int(os.environ.get("LORAPLEX_LORA_KERNEL_ROWS", "64"))
# Without the kernel, batches of at most this many rows (decode steps) compute in fp32 (see the
# module docstring); 0 turns the fp32 path off (bench/lora_cpu.py's `loraplex-model-dtype` ops).
SMALL_BATCH_ROWS = int(os.environ.get("LORAPLEX_LORA_FP32_ROWS", "16"))
# Sets of scattered slots whose gathered weights a layer keeps (FusedLoraWeights.gather).
GATHERED_SETS = 4


# -- the batch ---------------------------------------------------------------------------------


@dataclass(eq=False)
class StepLayout:
    """Which adapter slot each row of a batch uses; built once per model step, read by every
    LoRA layer of that step."""

    indices: torch.Tensor  # (rows,) slot per row, -1 for none
    rows: int
    present: tuple[int, ...]  # slots in use, ascending
    uniform: int | None  # the slot every row uses, when there is exactly one and no base row
    _masks: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, indices: torch.Tensor) -> StepLayout:
        values = indices.tolist()
        present = tuple(sorted({s for s in values if s >= 0}))
        uniform = present[0] if len(present) == 1 and min(values) >= 0 else None
        return cls(indices=indices, rows=len(values), present=present, uniform=uniform)

    @functools.cached_property
    def row_slots(self) -> int:
        """The address of `indices` as contiguous int64, for the C kernel (kept alive here)."""
        self._row_slots = self.indices.to(torch.int64).contiguous()
        return self._row_slots.data_ptr()

    def mask(self, slots: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """(rows, len(slots)): 1 where the row uses that slot."""
        key = (slots, dtype)
        found = self._masks.get(key)
        if found is None:
            wanted = torch.tensor(slots, dtype=self.indices.dtype, device=self.indices.device)
            found = (self.indices.unsqueeze(1) == wanted).to(dtype)
            self._masks[key] = found
        return found


# -- one layer's weights, fused ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FusedLoraWeights:
    """A LoRA layer's stacked weights rearranged for `apply_fused_lora`.

    a: (slots, slices * rank, in); b: (slots, slices * rank, out) block-diagonal over slices,
    with rank the largest any loaded adapter uses (0 when no slot has weights for this layer:
    nothing is stored then); nonzero: the slots holding an adapter with weights for this layer;
    small: the same weights in fp32 for decode-sized batches (None when SMALL_BATCH_ROWS is 0).
    """

    a: torch.Tensor
    b: torch.Tensor
    nonzero: frozenset[int]
    rank: int
    slices: tuple[int, ...] = ()
    small: SmallBatchWeights | None = None
    kernel: KernelWeights | None = None
    # Weights of scattered slots copied together, per set of slots (`gather`); a refresh makes a
    # new object, so these never outlive the weights they were copied from.
    gathered: dict[tuple[tuple[int, ...], bool], tuple[torch.Tensor, ...]] = field(
        default_factory=dict
    )

    @property
    def slots(self) -> int:
        return self.a.shape[0]

    @property
    def out_features(self) -> int:
        return self.b.shape[2]

    @classmethod
    def build(
        cls,
        a_stacked: Sequence[torch.Tensor],
        b_stacked: Sequence[torch.Tensor],
        output_slices: Sequence[int],
    ) -> FusedLoraWeights:
        """From vLLM's per-slice stacks: a (slots, 1, max_rank, in), b (slots, 1, out_i, max_rank).

        vLLM pads every adapter to max_lora_rank with zeros; the fused copy keeps only the ranks
        some loaded adapter uses, so a server allowing rank 64 pays rank 16 for rank-16 adapters.
        """
        a_parts, b_parts = _parts(a_stacked), _parts(b_stacked)
        slots, in_features = a_parts[0].shape[0], a_parts[0].shape[-1]
        rank = max(_used_rank(a, b) for a, b in zip(a_parts, b_parts, strict=True))
        a = a_parts[0].new_zeros((slots, len(a_parts) * rank, in_features))
        b = a.new_zeros((slots, len(b_parts) * rank, sum(output_slices)))
        fused = cls(a=a, b=b, nonzero=frozenset(), rank=rank, slices=tuple(output_slices))
        fused._copy(slice(None), a_parts, b_parts, output_slices)
        fused = replace(fused, nonzero=slots_with_weights(fused.a, fused.b))
        if not rank:
            return fused
        library = lora_kernel.library() if KERNEL_ROWS else None
        if library is not None and fused.a.dtype in lora_kernel.DTYPES:
            kernel = KernelWeights.of(fused, library, lora_kernel.rows_call())  # loaded together
            return replace(fused, kernel=kernel)
        if SMALL_BATCH_ROWS:
            return replace(fused, small=SmallBatchWeights.of(fused))
        return fused

    def refresh(
        self,
        slots: Iterable[int],
        a_stacked: Sequence[torch.Tensor],
        b_stacked: Sequence[torch.Tensor],
        output_slices: Sequence[int],
    ) -> FusedLoraWeights:
        """The same weights with `slots` copied again from vLLM's stacks (an adapter was
        activated there), in place; a whole new build when a slot needs a larger rank."""
        a_parts, b_parts = _parts(a_stacked), _parts(b_stacked)
        slots = list(slots)
        if not slots:
            return self
        pairs = zip(a_parts, b_parts, strict=True)
        if max(_used_rank(a[slots], b[slots]) for a, b in pairs) > self.rank:
            return FusedLoraWeights.build(a_stacked, b_stacked, output_slices)
        self._copy(slots, a_parts, b_parts, output_slices)
        if self.small is not None:
            self.small.copy_slots(self, slots)
        live = slots_with_weights(self.a[slots], self.b[slots])
        nonzero = frozenset((self.nonzero - set(slots)) | {slots[i] for i in live})
        if self.kernel is not None:
            self.kernel.copy_slots(self, slots, nonzero)
        return replace(self, nonzero=nonzero, gathered={})

    def gather(
        self, used: tuple[int, ...], small: SmallBatchWeights | None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """a, b (from `small` where given) and `small`'s per-slice Bs of the slots `used`, copied
        together. Kept: a batch's set of adapters stays the same for many decode steps, and
        copying every layer's weights of those slots at every step costs more than the product."""
        key = (used, small is not None)
        found = self.gathered.get(key)
        if found is None:
            if len(self.gathered) >= GATHERED_SETS:
                self.gathered.clear()
            picked = torch.tensor(used, device=self.a.device)
            a, b = (small.a, small.b) if small is not None else (self.a, self.b)
            parts = tuple(p.index_select(0, picked) for p in small.b_slices) if small else ()
            found = (a.index_select(0, picked), b.index_select(0, picked), *parts)
            self.gathered[key] = found
        return found[0], found[1], found[2:]

    def _copy(
        self,
        slots: list[int] | slice,
        a_parts: Sequence[torch.Tensor],
        b_parts: Sequence[torch.Tensor],
        output_slices: Sequence[int],
    ) -> None:
        """Copy `slots` of vLLM's (slots, m, n) stacks into a and b, in place."""
        rank = self.rank
        if not rank:
            return
        self.a[slots] = torch.cat([part[slots, :rank] for part in a_parts], dim=1)
        self.b[slots] = 0
        offset = 0
        for i, (part, size) in enumerate(zip(b_parts, output_slices, strict=True)):
            self.b[slots, i * rank : (i + 1) * rank, offset : offset + size] = part[
                slots, :size, :rank
            ].mT
            offset += size


@dataclass(frozen=True, eq=False)
class SmallBatchWeights:
    """fp32 copies of a layer's fused weights, for decode-sized batches.

    a, b: as `FusedLoraWeights.a` / `.b`, in fp32; b_slices: per output slice, (slots, rank,
    size) dense, so a mixed batch multiplies each slice by its own columns only (empty for a
    single-slice layer, whose b is already dense).
    """

    a: torch.Tensor
    b: torch.Tensor
    b_slices: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, fused: FusedLoraWeights) -> SmallBatchWeights:
        """From `fused`; an fp32 model's a and b are shared, not copied."""
        rank, slots = fused.rank, fused.slots
        sliced = tuple(
            fused.b.new_zeros((slots, rank, size), dtype=torch.float32) for size in fused.slices
        )
        shared = fused.a.dtype == torch.float32
        small = cls(
            a=fused.a if shared else torch.empty_like(fused.a, dtype=torch.float32),
            b=fused.b if shared else torch.empty_like(fused.b, dtype=torch.float32),
            b_slices=sliced if len(fused.slices) > 1 else (),
        )
        small.copy_slots(fused, slice(None))
        return small

    def copy_slots(self, fused: FusedLoraWeights, slots: list[int] | slice) -> None:
        """Copy `slots` of `fused` (just written) into these fp32 copies, in place."""
        if self.a is not fused.a:
            self.a[slots] = fused.a[slots].to(torch.float32)
            self.b[slots] = fused.b[slots].to(torch.float32)
        rank, offset = fused.rank, 0
        for i, (part, size) in enumerate(zip(self.b_slices, fused.slices, strict=False)):
            part[slots] = self.b[slots, i * rank : (i + 1) * rank, offset : offset + size]
            offset += size


@dataclass(frozen=True, eq=False)
class KernelWeights:
    """A layer's weights as the C kernel (`server.lora_kernel`) reads them, for decode-sized
    batches.

    a: `FusedLoraWeights.a` itself (no copy). b: compact, the block-diagonal B's blocks summed, so
    output slice i takes its coefficients from A's rows i*rank.. (no zeros multiplied); (slots,
    rank, out) fp32 for the expand step's fp32 FMAs, or, for bf16 models on CPUs with
    AVX512-BF16, bf16 with ranks in pairs, (slots, ceil(rank / 2), out, 2), the layout of its
    dot-product instruction (half the bytes, no conversion). live: (slots,) 1 where the slot
    holds weights for this layer. offsets: where each output slice starts, then out. ranks:
    (slots,) the rank each slot's adapter uses, so a rank-8 adapter next to a rank-64 one costs
    rank 8 (the fused weights are padded to the largest).
    """

    a: torch.Tensor
    b: torch.Tensor
    live: torch.Tensor
    offsets: torch.Tensor
    ranks: torch.Tensor
    layer: lora_kernel.Layer
    call: Callable[..., int]  # the kernel's entry point (`lora_kernel.rows_call`)
    address: int  # of `layer`

    @classmethod
    def of(
        cls, fused: FusedLoraWeights, library: ctypes.CDLL, call: Callable[..., int]
    ) -> KernelWeights:
        slots, rank, out = fused.slots, fused.rank, fused.out_features
        if fused.a.dtype == torch.bfloat16 and library.loraplex_bf16_dot():
            b = fused.a.new_zeros((slots, (rank + 1) // 2, out, 2))  # ranks in pairs
        else:
            b = fused.a.new_zeros((slots, rank, out), dtype=torch.float32)
        live = torch.zeros(slots, dtype=torch.uint8)
        offsets = torch.tensor((0, *itertools.accumulate(fused.slices)), dtype=torch.int64)
        ranks = torch.zeros(slots, dtype=torch.int64)
        layer = lora_kernel.layer(fused.a, b, live, offsets, ranks, fused.rank)
        kernel = cls(fused.a, b, live, offsets, ranks, layer, call, ctypes.addressof(layer))
        kernel.copy_slots(fused, slice(None), fused.nonzero)
        return kernel

    def copy_slots(
        self, fused: FusedLoraWeights, slots: list[int] | slice, nonzero: frozenset[int]
    ) -> None:
        """Copy `slots` of `fused` (just written) in, in place; `nonzero`: the slots live now."""
        blocks = fused.b[slots].unflatten(1, (len(fused.slices), fused.rank))
        compact = blocks.sum(1)  # (slots, rank, out): the blocks do not overlap, the sum is exact
        if self.b.dtype == torch.float32:
            self.b[slots] = compact.to(torch.float32)
        else:  # ranks 2p and 2p + 1 of a column side by side
            even = torch.nn.functional.pad(compact, (0, 0, 0, compact.shape[1] % 2))
            self.b[slots] = even.unflatten(1, (-1, 2)).transpose(2, 3)
        # a rank index is in use where some slice's A row and B column are non-zero
        a_rows = fused.a[slots].unflatten(1, (len(fused.slices), fused.rank)).abs().amax(3) > 0
        self.ranks[slots] = _ranks_in_use((a_rows & (blocks.abs().amax(3) > 0)).any(1))
        self.live.zero_()
        self.live[sorted(nonzero)] = 1

    def compact_b(self) -> torch.Tensor:
        """b as (slots, rank, out) fp32, whichever layout the kernel reads."""
        if self.b.dtype == torch.float32:
            return self.b
        pairs = self.b.transpose(2, 3).flatten(1, 2)  # (slots, 2 * ceil(rank / 2), out)
        return pairs[:, : self.layer.rank].to(torch.float32)

    def apply(self, y: torch.Tensor, x: torch.Tensor, layout: StepLayout, scale: float) -> bool:
        """y[:, :out] += scale * x @ A[slot]^T @ B[slot] per row, in one C call; False (nothing
        done) where the kernel does not take these tensors. Kept to few Python operations: it
        runs for every LoRA layer of every decode step."""
        code = lora_kernel.DTYPES.get(y.dtype)
        y_strides, x_strides = y.stride(), x.stride()
        if code is None or x.dtype is not y.dtype or y_strides[1] != 1 or x_strides[1] != 1:
            return False
        done = self.call(
            y.data_ptr(), y_strides[0], x.data_ptr(), x_strides[0], code, layout.row_slots,
            layout.rows, scale, self.address,
        )  # fmt: skip
        if done != 0:
            raise RuntimeError(f"CPU LoRA kernel failed ({done})")
        return True


def slots_with_weights(*stacks: torch.Tensor) -> frozenset[int]:
    """The indices along dim 0 where every one of `stacks` (same first dim) has a non-zero."""
    if any(t[0].numel() == 0 for t in stacks if len(t)):
        return frozenset()
    live = functools.reduce(operator.and_, (t.flatten(1).abs().amax(1) > 0 for t in stacks))
    return frozenset(int(s) for s in live.nonzero().flatten().tolist())


def _parts(stacks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """(slots, 1, m, n) stacks as (slots, m, n) views."""
    return [s.reshape(s.shape[0], s.shape[-2], s.shape[-1]) for s in stacks]


def _used_rank(a: torch.Tensor, b: torch.Tensor) -> int:
    """1 + the last rank index whose A row and B column are non-zero in some slot (0: none)."""
    if a.numel() == 0:
        return 0
    live = (a.abs().amax(dim=(0, 2)) > 0) & (b.abs().amax(dim=(0, 1)) > 0)
    return int(_ranks_in_use(live.unsqueeze(0))[0])


def _ranks_in_use(live: torch.Tensor) -> torch.Tensor:
    """(n, rank) bool, where each rank index is in use -> (n,) int64: 1 + the last one (0: none)."""
    last = live.shape[1] - live.flip(1).to(torch.int8).argmax(1)
    return torch.where(live.any(1), last, 0).to(torch.int64)


def apply_fused_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    layout: StepLayout,
    weights: FusedLoraWeights,
    scale: float = 1.0,
) -> None:
    """y[:, :out] += scale * each row's adapter's x @ A^T @ B; rows without one unchanged.

    Batches of at most KERNEL_ROWS rows take one call of the C kernel; otherwise decode-sized
    batches compute in fp32 (`SmallBatchWeights`, without the kernel) and larger ones keep the
    rank-r intermediate in the weights' dtype, as vLLM's expand op casts it to: two torch calls
    when the whole batch is on one adapter, three (small mixed batches: two plus one per slice)
    otherwise.
    """
    kernel = weights.kernel
    if kernel is not None and layout.rows <= KERNEL_ROWS and kernel.apply(y, x, layout, scale):
        return  # rows whose slot has no weights here are skipped inside
    small = weights.small if layout.rows <= SMALL_BATCH_ROWS else None
    a, b = (small.a, small.b) if small is not None else (weights.a, weights.b)
    if layout.uniform is not None:
        if layout.uniform not in weights.nonzero:
            return
        h = x.to(a.dtype) @ a[layout.uniform].T
        _add_product(y, h, b[layout.uniform], scale)
        return
    used = tuple(s for s in layout.present if s in weights.nonzero)
    if not used:
        return
    # The span of slots from the first to the last in use is a view (vLLM fills slots from 0);
    # gather only when most of that span is idle.
    span = slice(used[0], used[-1] + 1)
    slots: tuple[int, ...] = tuple(range(span.start, span.stop))
    if len(used) < ALL_SLOTS_MIN_SHARE * len(slots):
        slots = used
        a, b, parts = weights.gather(used, small)
    else:
        a, b = a[span], b[span]
        parts = tuple(p[span] for p in small.b_slices) if small is not None else ()
    width = a.shape[1]
    h = x.to(a.dtype) @ a.view(-1, a.shape[-1]).T  # (rows, slots * slices * rank)
    h.view(-1, len(slots), width).mul_(layout.mask(slots, h.dtype).unsqueeze(2))
    if small is None or not small.b_slices:
        _add_product(y, h, b.view(-1, b.shape[-1]), scale)
        return
    # Each slice's columns from its own dense B: h's (slot, slice, rank) columns regrouped.
    per_slice = h.view(h.shape[0], len(slots), len(small.b_slices), weights.rank)
    offset = 0
    for i, part in enumerate(parts):
        size = part.shape[2]
        hi = per_slice[:, :, i].reshape(h.shape[0], -1)
        _add_product(y[:, offset : offset + size], hi, part.view(-1, size), scale)
        offset += size


def _add_product(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """y[:, :out] += scale * h @ b, fused into one call where the dtypes allow."""
    target = y if y.shape[1] == b.shape[1] else y[:, : b.shape[1]]
    if target.dtype == h.dtype:
        target.addmm_(h, b, alpha=scale)
    else:  # fp32 product into the model's dtype: one rounding, in the add
        target.add_(torch.mm(h, b), alpha=scale)


# -- per-op replacements for vLLM's torch ops ---------------------------------------------------


def segmented_lora_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """rows[i] = inputs[i] @ weights[indices[i]].T, or zeros where indices[i] < 0.

    `weights` is the stacked adapter weights, (slots, out, in) or (slots, 1, out, in).
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    slots = torch.unique(indices).tolist()
    if len(slots) == 1 and slots[0] >= 0:  # the whole batch on one adapter: one product
        return x @ weights[slots[0]].to(dtype).T
    out = torch.zeros((x.shape[0], weights.shape[1]), dtype=dtype, device=x.device)
    for slot in slots:
        if slot < 0:
            continue
        rows = (indices == slot).nonzero(as_tuple=True)[0]
        out.index_copy_(0, rows, x.index_select(0, rows) @ weights[slot].to(dtype).T)
    return out


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    outputs = segmented_lora_matmul(
        inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype
    )
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    outputs = segmented_lora_matmul(
        inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype
    )
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # The adapter and the model may pad the output dimension differently.
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = segmented_lora_matmul(
        inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype
    )
    target = output_tensor[:, slice_offset : slice_offset + slice_size]
    if add_inputs:
        target += outputs
    else:
        target.copy_(outputs)


def _explode(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    """Per-sequence slots -> per-token slots (prefill metadata is per sequence)."""
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(
    inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
    lora_indices_tensor, batches, max_seq_length, token_nums, scaling,
) -> None:  # fmt: skip
    indices = _explode(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, indices, scaling)


def sgmv_expand(
    inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
    lora_indices_tensor, batches, max_seq_length, token_nums, add_inputs=False,
) -> None:  # fmt: skip
    indices = _explode(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs)


def sgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
    lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset, slice_size,
    add_inputs=False,
) -> None:  # fmt: skip
    indices = _explode(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(
        inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs
    )
