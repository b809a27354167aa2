"""Micro-benchmark of the CPU LoRA ops: the time one model step spends in LoRA, per implementation.

vLLM's CPU LoRA layers call a shrink and an expand op for every slice of every linear layer that
LoRA wraps (q/k/v, o, gate/up, down: 7 slices x 2 ops x 30 layers for SmolLM2-135M), whatever
modules the adapter targets. This replays exactly those calls, with the real weight-stack shapes
(max_loras slots of rank 16, fp32 intermediate buffer, weights and activations in the dtype
`loraplex serve` chooses for this CPU, `--dtype` to override), on one thread like vLLM's CPU
worker, for these implementations:

  vllm       vLLM's torch ops (gather each row's weights, einsum); rows without adapter are wrong
  segmented  server.lora_cpu_ops per-op replacements (one matmul per adapter present, per op)
  loraplex   server.lora_cpu_ops fused layer products (all slices of a layer at once; the batch's
             slot layout once per step, fused weights once per adapter activation), as
             `loraplex serve` runs them: decode-sized batches in one call of the C kernel
             (server/lora_kernel.c) per layer
  loraplex-torch
             the same without the kernel (torch, fp32 for decode-sized batches)
  harness    no LoRA at all: the replay's own cost (buffer allocation), to subtract

and for decode (8 rows) and prefill (8 prompts of 40 tokens) batches with rows on no adapter,
one adapter, or 4 adapters round-robin. It checks the three agree where vLLM's is right.

With `--with-base` each layer's LoRA follows its base layer's product (the model's shapes), so
the LoRA calls find the caches as the model's run leaves them: each layer's adapter weights,
and the code that reads them, pushed out by the base weights since the layer before. The LoRA's
cost is then the difference from `harness` (the base layers alone).

    .venv/bin/python bench/lora_ops.py
    .venv/bin/python bench/lora_ops.py --attn-only --with-base --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import machine_info  # noqa: E402
from bench.serving import add_dtype_option  # noqa: E402
from loraplex.hardware import choose_dtype  # noqa: E402

HIDDEN, INTERMEDIATE, KV, LAYERS = 576, 1536, 192, 30
# (input size, output slices) of each LoRA-wrapped linear layer of one decoder layer
LAYER_SHAPES: tuple[tuple[int, tuple[int, ...]], ...] = (
    (HIDDEN, (HIDDEN, KV, KV)),  # qkv_proj
    (HIDDEN, (HIDDEN,)),  # o_proj
    (HIDDEN, (INTERMEDIATE, INTERMEDIATE)),  # gate_up_proj
    (INTERMEDIATE, (HIDDEN,)),  # down_proj
)


@dataclass(frozen=True, slots=True)
class Ops:
    """Per-op implementations, called per slice as vLLM's CPU punica wrapper calls them."""

    shrink: Callable[..., None]  # (x, a_stack, out_fp32, indices, scale)
    expand_slice: Callable[..., None]  # (x_fp32, b_stack, y, indices, offset, size, add)


class Fused:
    """server.lora_cpu_ops' fused layer products, as the patched `add_lora_linear` runs them;
    `kernel=False`: as they run where the C kernel is not there."""

    def __init__(self, *, kernel: bool = True) -> None:
        self._weights: dict[int, Any] = {}
        self._kernel = kernel

    def weights(self, layer: Layer) -> Any:
        from server import lora_kernel
        from server.lora_cpu_ops import FusedLoraWeights

        found = self._weights.get(id(layer))
        if found is None:  # built once per adapter activation in the engine
            library = lora_kernel.library
            if not self._kernel:
                lora_kernel.library = lambda: None
            try:
                found = FusedLoraWeights.build(layer.a, layer.b, layer.slices)
            finally:
                lora_kernel.library = library
            self._weights[id(layer)] = found
        return found


def _no_op(*args: Any) -> None:
    pass


def implementations() -> dict[str, Ops | Fused]:
    from vllm.lora.ops.torch_ops import lora_ops as stock

    from server import lora_cpu_ops

    return {
        "vllm": Ops(stock.bgmv_shrink, stock.bgmv_expand_slice),
        "segmented": Ops(lora_cpu_ops.bgmv_shrink, lora_cpu_ops.bgmv_expand_slice),
        "loraplex": Fused(),
        "loraplex-torch": Fused(kernel=False),
        "harness": Ops(_no_op, _no_op),  # the replay's own cost (buffers), to subtract
    }


# -- the replay -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layer:
    a: tuple[Any, ...]  # per slice: (slots, 1, rank, in)
    b: tuple[Any, ...]  # per slice: (slots, 1, out, rank)
    slices: tuple[int, ...]
    base: Any = None  # (sum(slices), in): the base layer's weight, with --with-base


def make_layers(
    *,
    slots: int,
    rank: int,
    dtype: str,
    attn_only: bool = False,
    with_base: bool = False,
    seed: int = 0,
) -> list[Layer]:
    """Every LoRA-wrapped layer, weights in `dtype` (the model's); with `attn_only` the adapters
    target q/k/v/o only, so the MLP layers' stacks stay zero (vLLM wraps them all the same);
    with `with_base` each layer has its base weight too (the model's shapes, random)."""
    import torch

    weight_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for index, (in_size, slices) in enumerate(LAYER_SHAPES * LAYERS):
        empty = attn_only and index % len(LAYER_SHAPES) >= 2
        scale = 0.0 if empty else 0.05
        a = tuple(
            (torch.randn(slots, 1, rank, in_size, generator=gen) * scale).to(weight_dtype)
            for _ in slices
        )
        b = tuple(
            (torch.randn(slots, 1, out, rank, generator=gen) * scale).to(weight_dtype)
            for out in slices
        )
        base = None
        if with_base:
            base = (torch.randn(sum(slices), in_size, generator=gen) * 0.05).to(weight_dtype)
        layers.append(Layer(a=a, b=b, slices=slices, base=base))
    return layers


def _output(layer: Layer, x: Any, rows: int) -> Any:
    """What the LoRA adds to: the base layer's product, as in the model (whose weights push the
    adapters' out of the caches between layers), or zeros without base weights."""
    import torch

    if layer.base is not None:
        return x @ layer.base.T
    return torch.zeros(rows, sum(layer.slices), dtype=layer.a[0].dtype)


def model_step(
    ops: Ops | Fused, layers: list[Layer], inputs: dict[int, Any], indices: Any
) -> list[Any]:
    """Every LoRA call of one forward pass, as vLLM's CPU punica wrapper makes them."""
    import torch

    if isinstance(ops, Fused):
        from server.lora_cpu_ops import StepLayout, apply_fused_lora

        layout = StepLayout.of(indices)  # once per step (update_metadata)
        outputs = []
        for layer in layers:
            x = inputs[layer.a[0].shape[-1]]
            y = _output(layer, x, indices.shape[0])
            if layout.present:
                apply_fused_lora(y, x, layout, ops.weights(layer))
            outputs.append(y)
        return outputs
    outputs = []
    rows = indices.shape[0]
    for layer in layers:
        x = inputs[layer.a[0].shape[-1]]
        y = _output(layer, x, rows)
        rank = layer.a[0].shape[-2]
        buffers = [torch.zeros(rows, rank, dtype=torch.float32) for _ in layer.slices]
        for a, buf in zip(layer.a, buffers, strict=True):
            ops.shrink(x, a, buf, indices, 1.0)
        offset = 0
        for b, buf, size in zip(layer.b, buffers, layer.slices, strict=True):
            ops.expand_slice(buf, b, y, indices, offset, size, True)
            offset += size
        outputs.append(y)
    return outputs


def row_indices(kind: str, rows: int, *, slots: int, per_row: int = 1) -> Any:
    import torch

    if kind == "base":
        per_seq = [-1] * rows
    elif kind == "one":
        per_seq = [0] * rows
    else:  # mixed: slots round-robin
        per_seq = [i % slots for i in range(rows)]
    return torch.tensor(per_seq, dtype=torch.long).repeat_interleave(per_row)


def time_steps(
    impls: dict[str, Ops | Fused], layers: list[Layer], indices: Any, *, repeats: int
) -> dict[str, float]:
    """Median ms of one model step's LoRA calls, per implementation; the implementations take
    turns (the order reversed every other turn), so the machine's drift hits them all alike."""
    import torch

    rows = indices.shape[0]
    gen = torch.Generator().manual_seed(1)
    inputs = {
        size: torch.randn(rows, size, generator=gen).to(layers[0].a[0].dtype)
        for size in (HIDDEN, INTERMEDIATE)
    }
    for ops in impls.values():
        model_step(ops, layers, inputs, indices)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in impls}
    for turn in range(repeats):
        for name in list(impls)[:: 1 if turn % 2 == 0 else -1]:
            started = time.perf_counter()
            model_step(impls[name], layers, inputs, indices)
            times[name].append(time.perf_counter() - started)
    return {name: round(statistics.median(t) * 1000, 2) for name, t in times.items()}


def check_agreement(
    impls: dict[str, Ops | Fused], layers: list[Layer], *, slots: int
) -> dict[str, float]:
    """Largest difference from the segmented ops, on a mixed batch without base rows."""
    import torch

    indices = row_indices("mixed", 8, slots=slots)
    gen = torch.Generator().manual_seed(2)
    dtype = layers[0].a[0].dtype
    inputs = {s: torch.randn(8, s, generator=gen).to(dtype) for s in (HIDDEN, INTERMEDIATE)}
    reference = model_step(impls["segmented"], layers[:8], inputs, indices)
    diffs = {}
    for name, ops in impls.items():
        got = model_step(ops, layers[:8], inputs, indices)
        diffs[name] = max(
            float((g.float() - r.float()).abs().max()) for g, r in zip(got, reference, strict=True)
        )
    return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slots", type=int, default=4, help="max_loras (weight-stack slots)")
    p.add_argument("--rank", type=int, default=16, help="max_lora_rank")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (vLLM's worker: 1)")
    p.add_argument(
        "--attn-only", action="store_true",
        help="adapters on q/k/v/o only: gate_up/down stay wrapped, their weights zero",
    )  # fmt: skip
    p.add_argument(
        "--with-base", action="store_true",
        help="each LoRA call after its base layer's product (model-sized weights): the caches "
        "as the model leaves them; `harness` is then the base layers alone",
    )  # fmt: skip
    add_dtype_option(p, what="weights' and activations'")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = p.parse_args(argv)
    dtype = choose_dtype(args.dtype, cuda=False).dtype  # these ops run on the CPU

    import os

    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    import torch

    torch.set_num_threads(args.threads)
    impls = implementations()
    layers = make_layers(
        slots=args.slots, rank=args.rank, dtype=dtype, attn_only=args.attn_only,
        with_base=args.with_base,
    )  # fmt: skip
    batches = {"decode x8": (8, 1), "prefill 8x40": (8, 40)}
    figures: dict[str, dict[str, float]] = {}
    wrapped = "qkv, o, gate_up, down" + (" (adapters on qkv, o only)" if args.attn_only else "")
    print(
        f"ms of LoRA ops per model step ({LAYERS} layers x {wrapped}; {args.threads} thread(s), "
        f"{dtype})"
    )
    print(f"{'batch':<14} {'rows on':<8} " + " ".join(f"{n:>9}" for n in impls))
    for batch, (seqs, per_seq) in batches.items():
        repeats = args.repeats if per_seq == 1 else max(3, args.repeats // 4)
        for kind in ("base", "one", "mixed"):
            indices = row_indices(kind, seqs, slots=args.slots, per_row=per_seq)
            row = time_steps(impls, layers, indices, repeats=repeats)
            figures[f"{batch} / {kind}"] = row
            print(f"{batch:<14} {kind:<8} " + " ".join(f"{row[n]:>9}" for n in impls))
    diffs = check_agreement(
        {n: o for n, o in impls.items() if n != "harness"}, layers, slots=args.slots
    )
    print(f"max |difference| from the segmented ops on a mixed batch: {diffs}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {"slots": args.slots, "rank": args.rank, "threads": args.threads,
                    "attn_only": args.attn_only, "with_base": args.with_base,
                    "dtype": dtype}  # fmt: skip
        document = {
            "benchmark": "lora_ops", "machine": machine_info(dtype), "settings": settings,
            "ms_per_step": figures, "max_abs_diff": diffs,
        }  # fmt: skip
        args.out.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
