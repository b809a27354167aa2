"""Candidate CPU LoRA ops ("stacked"), measured by bench/lora_ops.py and bench/tuning.py.

Same contract as vLLM's torch `bgmv_shrink` / `bgmv_expand_slice` and loraplex's replacements in
`server.vllm_patches` (rows with slot -1 get exactly zero), but with a fixed, small number of
torch calls per op whatever the mix of adapters in the batch:

- no row on an adapter: nothing to compute;
- every row on the same adapter: one matmul against that slot;
- otherwise: one product against all slots at once. Shrink: x @ A_all^T, then a one-hot slot
  mask keeps each row's own rank-r part. Expand: the mask spreads each row's r values into its
  slot's block, then one matmul with B of all slots concatenated (cached per weight version), or,
  where the weights carry no version counter (inference tensors), one batched matmul over the
  slots summed.

Computing every slot costs max_loras x the LoRA FLOPs, which at rank 16 is still far below the
base layer's; what it saves is the per-adapter loop of small calls that dominates on CPU. The
slot mask is computed once per batch composition and reused by every layer of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch  # noqa: TID253 - only loaded by the op benchmarks, which need torch anyway


@dataclass(frozen=True, slots=True)
class StepSlots:
    mask: torch.Tensor  # (rows, slots): 1 where the row uses the slot
    uniform: int | None  # the slot every row uses, if they all use the same one
    any_adapter: bool


_steps: dict[tuple[tuple[int, ...], int, torch.dtype], StepSlots] = {}
_b_concat: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
_MAX_CACHED_STEPS = 64


def step_slots(indices: torch.Tensor, slots: int, dtype: torch.dtype) -> StepSlots:
    """The slot facts of a batch's rows, cached by the indices' content: every layer of a step
    asks with the same indices (vLLM runs under inference mode, whose tensors carry no version
    counter, so content is the only safe key)."""
    content = tuple(indices.tolist())
    key = (content, slots, dtype)
    found = _steps.get(key)
    if found is None:
        adapters = {s for s in content if s >= 0}
        mask = (indices.unsqueeze(1) == torch.arange(slots, device=indices.device)).to(dtype)
        uniform = None
        if len(adapters) == 1 and min(content) >= 0:
            uniform = content[0]
        found = StepSlots(mask=mask, uniform=uniform, any_adapter=bool(adapters))
        if len(_steps) >= _MAX_CACHED_STEPS:
            _steps.clear()
        _steps[key] = found
    return found


def concatenated_b(b_stack: torch.Tensor) -> torch.Tensor | None:
    """(slots, [1,] out, rank) -> (slots * rank, out), cached per weight version; None where the
    weights carry no version counter (inference tensors), since a cache could then go stale."""
    if b_stack.is_inference():
        return None
    found = _b_concat.get(id(b_stack))
    if found is not None and found[0] == b_stack._version and found[1] is b_stack:
        return found[2]
    slots, out, rank = b_stack.shape[0], b_stack.shape[-2], b_stack.shape[-1]
    cat = b_stack.reshape(slots, out, rank).transpose(1, 2).reshape(slots * rank, out)
    _b_concat[id(b_stack)] = (b_stack._version, b_stack, cat.contiguous())
    return _b_concat[id(b_stack)][2]


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    slots, rank = lora_a_weights.shape[0], lora_a_weights.shape[-2]
    weights = lora_a_weights.view(slots * rank, lora_a_weights.shape[-1])
    info = step_slots(lora_indices_tensor, slots, weights.dtype)
    target = output_tensor[:, :rank]
    if not info.any_adapter:
        target.zero_()
        return
    # In the weights' dtype (bf16): vLLM's op computes in its fp32 buffer's dtype, which costs
    # 2x on prefill here; the rank-r intermediate then differs by bf16 rounding (1 ulp).
    x = inputs.to(weights.dtype)
    if info.uniform is not None:
        result = x @ weights[info.uniform * rank : (info.uniform + 1) * rank].T
    else:
        every = (x @ weights.T).view(-1, slots, rank)
        result = (every * info.mask.unsqueeze(2)).sum(1)
    target.copy_(result if scaling == 1.0 else result * scaling)


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    slots, rank = lora_b_weights.shape[0], lora_b_weights.shape[-1]
    info = step_slots(lora_indices_tensor, slots, lora_b_weights.dtype)
    target = output_tensor[:, slice_offset : slice_offset + slice_size]
    if not info.any_adapter:
        if not add_inputs:
            target.zero_()
        return
    x = inputs.to(lora_b_weights.dtype)
    stack = lora_b_weights.view(slots, lora_b_weights.shape[-2], rank)
    if info.uniform is not None:
        result = x @ stack[info.uniform, :slice_size].T
    elif (cat := concatenated_b(lora_b_weights)) is not None:
        spread = (x.unsqueeze(1) * info.mask.unsqueeze(2)).view(x.shape[0], slots * rank)
        result = spread @ cat[:, :slice_size]
    else:  # per-slot products in one batched call, summed over slots
        spread = x.unsqueeze(0) * info.mask.T.unsqueeze(2)  # (slots, rows, rank)
        result = torch.bmm(spread, stack[:, :slice_size].transpose(1, 2)).sum(0)
    if add_inputs:
        target += result.to(target.dtype)
    else:
        target.copy_(result)
