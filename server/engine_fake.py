"""A deterministic in-memory engine that honours the `Engine` protocol, for fast tests of the HTTP
layer. It never replaces the real engine in the suite; it makes error paths and stream shapes cheap
to test.

Tokens are whitespace-separated words (id = position in a growing vocabulary). The answer to a
prompt is a fixed sentence, prefixed with `[KEY]` when an adapter is used, truncated at
`max_tokens` words or at the first stop string. `kill()` makes it die as a vLLM engine whose
core process exited: dead for good, in-flight generations fail with `EngineDeadError`.
Its `vllm:*` metrics come from its own counts: running = generations in progress (it queues
nothing), the LoRA series from the adapters those generations use, KV-cache use 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from server.engine import AdapterHandle, GenerationDelta, GenerationRequest, ModelInfo
from server.errors import AdapterLoadError, EngineDeadError, EngineNotReadyError, OverloadedError
from server.metrics import LoraRequestsInfo, engine_gauges

ANSWER = "the quick brown fox jumps over the lazy dog"


class FakeEngine:
    def __init__(
        self,
        *,
        served_name: str = "fake",
        max_model_len: int = 256,
        token_delay: float = 0.0,
        start_delay: float = 0.0,
        max_in_flight: int | None = None,
    ):
        self._info = ModelInfo(
            served_name=served_name,
            path="fake://model",
            max_model_len=max_model_len,
            max_lora_rank=16,
            max_loras=4,
        )
        self._token_delay = token_delay
        self._start_delay = start_delay
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._running_adapters: list[str] = []  # adapter key per generation in progress
        self._lora_info = LoraRequestsInfo(max_lora=self._info.max_loras)
        self._ready = False
        self._dead: str | None = None  # why it died; set by kill()
        self._aborted: str | None = None  # why generations in progress end; set by abort_all()
        self._vocab: dict[str, int] = {}
        self._words: list[str] = []
        self._adapters: dict[int, AdapterHandle] = {}
        self.requests: list[GenerationRequest] = []  # what was generated, for assertions

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def ready(self) -> bool:
        return self._ready and self._dead is None

    @property
    def dead(self) -> bool:
        return self._dead is not None

    def kill(self, reason: str = "the fake engine was killed") -> None:
        """Die as an engine whose core process exited: nothing it does succeeds again."""
        self._dead = reason

    async def start(self) -> None:
        await asyncio.sleep(self._start_delay)
        self._ready = True

    async def shutdown(self) -> None:
        self._ready = False

    async def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"The engine has stopped: {self._dead}.")
        if not self._ready:
            raise EngineNotReadyError()

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        text = " ".join(f"<{m['role']}> {m['content']}" for m in messages)
        return self.tokenize(text + (" <assistant>" if add_generation_prompt else ""))

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if word not in self._vocab:
                self._vocab[word] = len(self._words)
                self._words.append(word)
            ids.append(self._vocab[word])
        return ids

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        await self.check_health()
        if self._max_in_flight is not None and self._in_flight >= self._max_in_flight:
            raise OverloadedError("Too many requests in flight; retry later.")
        self.requests.append(request)
        words = ANSWER.split()
        if request.adapter is not None:
            words = [f"[{request.adapter.key}]", *words]
        request.stats.prompt_tokens = len(request.prompt_token_ids)
        self._in_flight += 1
        self._track(request, started=True)
        try:
            for index in range(request.options.n):
                async for delta in self._choice(index, words, request):
                    yield delta
        finally:
            self._in_flight -= 1
            self._track(request, started=False)

    def _track(self, request: GenerationRequest, *, started: bool) -> None:
        if request.adapter is not None:
            if started:
                self._running_adapters.append(request.adapter.key)
            else:
                self._running_adapters.remove(request.adapter.key)
        self._lora_info.record(self._running_adapters)

    async def _choice(
        self, index: int, words: list[str], request: GenerationRequest
    ) -> AsyncIterator[GenerationDelta]:
        options = request.options
        emitted = ""
        for i, word in enumerate(words[: options.max_tokens]):
            piece = word if i == 0 else f" {word}"
            if any(stop in emitted + piece for stop in options.stop):
                yield GenerationDelta(index=index, text="", token_ids=(), finish_reason="stop")
                return
            await asyncio.sleep(self._token_delay)
            await self.check_health()  # a death mid-stream fails the stream, as in vLLM
            if self._aborted is not None:
                raise EngineNotReadyError(self._aborted)
            emitted += piece
            request.stats.completion_tokens += 1
            last = i == len(words) - 1 or i == options.max_tokens - 1
            reason = None if not last else ("stop" if i == len(words) - 1 else "length")
            yield GenerationDelta(
                index=index, text=piece, token_ids=(self.tokenize(word)[0],), finish_reason=reason
            )

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        if adapter.path.startswith("bad"):
            raise AdapterLoadError(
                f"Adapter {adapter.key} could not be loaded", adapter=adapter.key
            )
        self._adapters[adapter.engine_id] = adapter

    async def remove_adapter(self, adapter: AdapterHandle) -> None:
        self._adapters.pop(adapter.engine_id, None)

    async def loaded_adapters(self) -> set[int]:
        return set(self._adapters)

    async def abort_all(self, reason: str) -> None:
        self._aborted = reason

    def metric_families(self) -> Iterable[Any]:
        running = self._in_flight if self.ready else 0
        families = engine_gauges(
            model_name=self._info.served_name, running=running, waiting=0, kv_cache_usage=0.0
        )
        lora = self._lora_info.family() if self.ready else None
        return families if lora is None else [*families, lora]
