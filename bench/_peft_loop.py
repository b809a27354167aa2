"""The baseline: a plain transformers + peft loop, one request at a time, `set_adapter` per request.

Every adapter is loaded into one `PeftModel` up front; each request switches to its adapter (or
runs inside `disable_adapter()` for the base model) and calls greedy `generate` with
`min_new_tokens = max_new_tokens`, the equivalent of `ignore_eos`. Requests are served in order,
so TTFT here is the service time to the first token, without queueing. It computes in the dtype
this CPU runs fast (`loraplex.hardware.choose_dtype`) unless told otherwise.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._workload import (
    BASE_MODEL,
    RequestResult,
    ScenarioResult,
    WorkItem,
    chat_messages,
    summarize,
)
from loraplex.hardware import choose_dtype

TORCH_THREADS = 2
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True, slots=True)
class DtypeProbe:
    dtype: str
    output_tokens_per_second: float


class _FirstTokenClock:
    """A `generate` streamer that notes when the first new token arrives (put #2; #1 is the prompt)."""

    def __init__(self) -> None:
        self._puts = 0
        self.first_token_at: float | None = None

    def put(self, value: Any) -> None:
        self._puts += 1
        if self._puts == 2 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class PeftLoop:
    def __init__(self, model_dir: Path, adapters: dict[str, Path], *, dtype: str | None = None):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(TORCH_THREADS)
        dtype = dtype or choose_dtype(cuda=False).dtype  # the loop runs on the CPU
        self.dtype = dtype
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        names = list(adapters)
        model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
        self._model = model.eval()
        self._prompts: dict[str, Any] = {}

    def _input_ids(self, prompt: str) -> Any:
        if prompt not in self._prompts:
            self._prompts[prompt] = self._tokenizer.apply_chat_template(
                chat_messages(prompt), add_generation_prompt=True, return_tensors="pt",
                return_dict=True,
            )["input_ids"]  # fmt: skip
        return self._prompts[prompt]

    @contextlib.contextmanager
    def _serving(self, model_name: str) -> Iterator[None]:
        if model_name == BASE_MODEL:
            with self._model.disable_adapter():
                yield
        else:
            self._model.set_adapter(model_name)
            yield

    def run_one(self, item: WorkItem, *, max_tokens: int) -> RequestResult:
        input_ids = self._input_ids(item.prompt)
        clock = _FirstTokenClock()
        started = time.perf_counter()
        with self._torch.inference_mode(), self._serving(item.model):
            output = self._model.generate(
                input_ids=input_ids,
                attention_mask=self._torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                pad_token_id=self._tokenizer.eos_token_id,
                streamer=clock,
            )
        ended = time.perf_counter()
        return RequestResult(
            ttft_seconds=(clock.first_token_at or ended) - started,
            e2e_seconds=ended - started,
            output_tokens=int(output.shape[1] - input_ids.shape[1]),
        )

    def run(self, items: list[WorkItem], *, max_tokens: int) -> tuple[list[RequestResult], float]:
        started = time.perf_counter()
        results = [self.run_one(item, max_tokens=max_tokens) for item in items]
        return results, time.perf_counter() - started

    def measure_scenario(
        self, *, scenario: str, items: list[WorkItem], warmup: list[WorkItem], max_tokens: int
    ) -> ScenarioResult:
        self.run(warmup, max_tokens=min(8, max_tokens))
        results, wall = self.run(items, max_tokens=max_tokens)
        return summarize(results, wall_seconds=wall, concurrency=1, scenario=scenario)


def probe_dtypes(
    model_dir: Path, adapters: dict[str, Path], *, items: list[WorkItem], max_tokens: int
) -> list[DtypeProbe]:
    """Time the same few requests in each dtype; the fastest is what the baseline should use."""
    probes = []
    for dtype in DTYPES:
        loop = PeftLoop(model_dir, adapters, dtype=dtype)
        loop.run(items[:1], max_tokens=4)  # first-call overheads
        results, wall = loop.run(items, max_tokens=max_tokens)
        tokens = sum(r.output_tokens for r in results)
        probes.append(DtypeProbe(dtype=dtype, output_tokens_per_second=round(tokens / wall, 2)))
        del loop
    return probes
