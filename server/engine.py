"""The engine seam: the only interface the HTTP layer uses to generate text.

It owns the value types that cross the seam (what to generate, which adapter, what came out) and
the `Engine` protocol. It knows nothing about HTTP, OpenAI's JSON shapes or the registry; the vLLM
implementation lives in `server.engine_vllm`, a deterministic fake in `server.engine_fake`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class AdapterHandle:
    """One adapter version as the engine knows it: a stable integer id and a local folder."""

    key: str  # "NAME@VERSION" or a local name; the identity, never reused for other weights
    engine_id: int  # stable, > 0, unique per key for the engine's lifetime
    path: str


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """Sampling and stopping parameters, engine-neutral (mirrors the OpenAI request fields)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logprobs: int | None = None  # top-k alternatives per generated token; 0 = only the chosen
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class GenerationDelta:
    """New output of one choice since the previous delta of the same request."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished


@dataclass(slots=True)
class GenerationStats:
    """Counts for one request, complete when the stream ends."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ModelInfo:
    served_name: str
    path: str
    max_model_len: int
    max_lora_rank: int
    max_loras: int
    dtype: str = "float32"  # what the model computes in ("auto" until a GPU engine resolves it)
    dtype_reason: str = ""  # why that dtype (loraplex.hardware.choose_dtype)


@dataclass(slots=True)
class GenerationRequest:
    """Everything the engine needs for one request. `prompt_token_ids` is already templated."""

    request_id: str
    prompt_token_ids: list[int]
    options: SamplingOptions
    adapter: AdapterHandle | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)


class Engine(Protocol):
    """What the HTTP layer needs from an inference backend."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def ready(self) -> bool: ...

    @property
    def dead(self) -> bool:
        """True once the engine can never serve again in this process (its core died); a
        supervisor must restart the server. False while starting, serving or shut down."""

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def check_health(self) -> None:
        """Raise `EngineDeadError` when dead, `EngineNotReadyError` when it cannot serve now."""

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Apply the model's chat template and tokenize. Raises `InvalidRequestError`."""

    def tokenize(self, text: str) -> list[int]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream deltas until every choice has finished; fills `request.stats` on the way."""

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        """Load an adapter so later `generate` calls may use it. Raises `AdapterLoadError`."""

    async def remove_adapter(self, adapter: AdapterHandle) -> None: ...

    async def loaded_adapters(self) -> set[int]: ...

    async def abort_all(self, reason: str) -> None:
        """End every generation in progress: each raises `EngineNotReadyError(reason)` (the
        server is stopping and its drain time is up)."""

    def metric_families(self) -> Iterable[Any]:
        """The engine's Prometheus families under vLLM's names and semantics (`vllm:*`, see
        `server.metrics`), for /metrics; the scalar gauges read 0 while not ready."""
