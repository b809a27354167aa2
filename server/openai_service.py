"""Chat and text completions: OpenAI request in, engine stream through, OpenAI response out.

Owns prompt preparation (chat template and tokenization via the engine, on a worker thread so a
huge prompt never stalls other streams; context-length checks), the mapping of request fields to
`SamplingOptions`, and the shapes of responses and SSE chunks. It does not know FastAPI: routes
in `server.api` call it and turn its results into HTTP responses.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from server.ab.recorder import RequestOutcome
from server.engine import Engine, GenerationDelta, GenerationRequest, SamplingOptions
from server.errors import ContextLengthError, InvalidRequestError, LoraplexError, error_body
from server.metrics import ServerMetrics
from server.protocol import DEFAULT_PROMPT, ChatCompletionRequest, CompletionRequest
from server.responses import response_body, sse_chunks
from server.streams import Merged, collect, merge_streams
from server.targets import ModelResolver, Target


@dataclass(slots=True)
class Prepared:
    """A request ready for the engine: what serves it and one engine request per prompt."""

    target: Target
    requests: list[GenerationRequest]
    endpoint: str
    response_id: str
    created: int
    started: float
    include_usage: bool
    ended: bool = False  # the request's end was observed: lease returned, gauge down
    continuous_usage: bool = False
    echo: list[str] | None = None  # completions with echo: each prompt's text, by prompt index
    ttft: float | None = None  # seconds to the first token, once seen


T = TypeVar("T")
# OpenAI: top_p 0 keeps only the most likely token; vLLM requires top_p > 0, and any tiny value
# keeps exactly that one token.
_MIN_TOP_P = 1e-9


class EventStream:
    """The SSE lines of one streamed response. `aclose()` ends the request however the response
    went: finished, client gone mid-stream, or body never iterated (a server may drop a
    response whose client left before it started), so the adapter lease and the in-flight
    gauge are always returned, and only once."""

    def __init__(self, lines: AsyncGenerator[str, None], abandon: Callable[[], Awaitable[None]]):
        self._lines = lines
        self._abandon = abandon

    def __aiter__(self) -> AsyncGenerator[str, None]:
        return self._lines

    async def aclose(self) -> None:
        await self._lines.aclose()  # runs the generator's own ending if it started
        await self._abandon()


class CompletionService:
    def __init__(self, engine: Engine, resolver: ModelResolver, metrics: ServerMetrics):
        self._engine = engine
        self._resolver = resolver
        self._metrics = metrics
        # One worker: tokenizers are not safe to call from several threads at once (vLLM also
        # renders on one thread); requests still queue behind each other, never the event loop.
        self._prompts = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-prompts")

    async def _off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Prompt work (template, tokenizer) on the prompt thread. What fails there fails on
        the client's text (lone surrogates, which JSON allows and UTF-8 does not): a 400."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._prompts, lambda: fn(*args, **kwargs))
        except (TypeError, ValueError, UnicodeError) as e:
            raise InvalidRequestError(f"The prompt could not be tokenized: {e}") from e

    # -- preparation --------------------------------------------------------------------------

    async def prepare_chat(
        self, req: ChatCompletionRequest, *, user: str | None = None
    ) -> Prepared:
        """`user`: the sticky A/B key (the request's `user` field, else the header)."""
        started = time.perf_counter()
        problems = _chat_problems(req)
        if problems:
            raise InvalidRequestError("; ".join(problems), param="messages")
        target = await self._resolver.resolve(req.model, user=user)
        try:
            return await self._prepare_chat(req, target, started)
        except BaseException:
            target.done()
            raise

    async def _prepare_chat(
        self, req: ChatCompletionRequest, target: Target, started: float
    ) -> Prepared:
        messages = [m.template_input() for m in req.messages]
        prompt = await self._off_loop(
            self._engine.render_chat,
            messages,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            chat_template_kwargs=req.chat_template_kwargs,
        )
        max_tokens = self._max_tokens(
            len(prompt), req.max_completion_tokens or req.max_tokens, param="messages"
        )
        top = (req.top_logprobs or 0) if req.logprobs else None
        options = _options(req, max_tokens=max_tokens, logprobs=top)
        options = _with_response_format(options, req)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return Prepared(
            target=target,
            requests=[GenerationRequest(rid, prompt, options, target.adapter)],
            endpoint="chat",
            response_id=rid,
            created=int(time.time()),
            started=started,
            include_usage=req.include_usage(),
            continuous_usage=_continuous_usage(req),
        )

    async def prepare_completion(
        self, req: CompletionRequest, *, user: str | None = None
    ) -> Prepared:
        started = time.perf_counter()
        target = await self._resolver.resolve(req.model, user=user)
        try:
            return await self._prepare_completion(req, target, started)
        except BaseException:
            target.done()
            raise

    async def _prepare_completion(
        self, req: CompletionRequest, target: Target, started: float
    ) -> Prepared:
        prompts = await self._off_loop(self._token_prompts, req.prompts())
        rid = f"cmpl-{uuid.uuid4().hex}"
        requests = []
        for i, prompt in enumerate(prompts):
            max_tokens = self._max_tokens(len(prompt), req.max_tokens, param="prompt")
            options = _options(req, max_tokens=max_tokens, logprobs=req.logprobs)
            requests.append(GenerationRequest(f"{rid}-{i}", prompt, options, target.adapter))
        return Prepared(
            target=target,
            requests=requests,
            endpoint="completions",
            response_id=rid,
            created=int(time.time()),
            started=started,
            include_usage=req.include_usage(),
            continuous_usage=_continuous_usage(req),
            echo=[p for p in req.prompts() if isinstance(p, str)] if req.echo else None,
        )

    def _token_prompts(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Token ids of each prompt. An empty text prompt is OpenAI's default prompt."""
        result = []
        for p in prompts:
            ids = p if isinstance(p, list) else self._engine.tokenize(p or DEFAULT_PROMPT)
            result.append(ids or self._engine.tokenize(DEFAULT_PROMPT))
        return result

    def _max_tokens(self, prompt_len: int, requested: int | None, *, param: str) -> int:
        limit = self._engine.info.max_model_len
        if prompt_len >= limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens; the prompt has "
                f"{prompt_len} tokens, which leaves no room for a completion.",
                param=param,
            )
        if requested is None:
            return limit - prompt_len
        if prompt_len + requested > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
                f"completion). Reduce the prompt or max_tokens (at most {limit - prompt_len}).",
                param="max_tokens",
            )
        return requested

    # -- execution ----------------------------------------------------------------------------

    def _merged(self, prepared: Prepared) -> Merged:
        n = prepared.requests[0].options.n
        if prepared.requests[0].options.max_tokens == 0:  # echo alone: nothing to generate
            streams = [_prompt_only(r) for r in prepared.requests]
        else:
            streams = [self._engine.generate(r) for r in prepared.requests]
        return merge_streams(streams, choices_per_stream=n)

    async def complete(self, prepared: Prepared) -> dict:
        """Run to the end and return the whole OpenAI response body."""
        status = 500
        self._metrics.in_flight.inc()
        try:
            collected = await collect(self._merged(prepared), on_first_token=self._ttft(prepared))
            status = 200
            return response_body(prepared, collected)
        except LoraplexError as e:
            status = error_body(e)[0]
            raise
        finally:
            self._observe(prepared, status)

    async def open_stream(self, prepared: Prepared) -> EventStream:
        """Start generating and wait for the first delta, so that a refusal (overload, bad
        parameters) is still an HTTP status; then hand over the SSE lines. The caller must
        `aclose()` the stream when the response ends, however it ends."""
        merged = self._merged(prepared)
        self._metrics.in_flight.inc()
        try:
            first = await anext(merged, None)
        except LoraplexError as e:
            self._observe(prepared, error_body(e)[0])
            raise
        except BaseException:
            self._observe(prepared, 500)
            raise

        async def abandon() -> None:
            self._observe(prepared, 499)  # a no-op once the lines ran to their end
            await merged.aclose()  # aborts the engine requests

        return EventStream(self._stream(prepared, merged, first), abandon)

    async def _stream(
        self, prepared: Prepared, merged: Merged, first: tuple[int, GenerationDelta] | None
    ) -> AsyncIterator[str]:
        """SSE `data:` lines, ending with `[DONE]`; an error mid-stream becomes an error event."""
        status = 500
        try:
            stream = _prepend(first, merged)
            async for chunk in sse_chunks(prepared, stream, self._ttft(prepared)):
                yield chunk
            status = 200
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away; the engine request is aborted
            raise
        except Exception as e:  # the status line is sent already: report in-band, then close
            yield f"data: {json.dumps(error_body(e)[1])}\n\n"
        finally:
            self._observe(prepared, status)
        yield "data: [DONE]\n\n"

    def _ttft(self, prepared: Prepared):
        fired = False

        def on_first_token() -> None:
            nonlocal fired
            if not fired:
                fired = True
                elapsed = time.perf_counter() - prepared.started
                prepared.ttft = elapsed
                self._metrics.ttft.labels(prepared.target.served_as).observe(elapsed)

        return on_first_token

    def _observe(self, prepared: Prepared, status: int) -> None:
        """Once per request, when it ends: metrics, and the adapter lease is returned."""
        if prepared.ended:
            return
        prepared.ended = True
        prepared.target.done()
        self._metrics.in_flight.dec()
        seconds = time.perf_counter() - prepared.started
        generated = sum(r.stats.completion_tokens for r in prepared.requests)
        self._metrics.observe_request(
            model=prepared.target.served_as,
            endpoint=prepared.endpoint,
            status=status,
            seconds=seconds,
            prompt_tokens=sum(r.stats.prompt_tokens for r in prepared.requests),
            generation_tokens=generated,
        )
        if prepared.target.on_end is not None and status != 499:  # a client gone: no outcome
            prepared.target.on_end(
                RequestOutcome(prepared.response_id, status, seconds, prepared.ttft, generated)
            )


async def _prepend(first: tuple[int, GenerationDelta] | None, rest: Merged) -> Merged:
    if first is not None:
        yield first
        async for item in rest:
            yield item


async def _prompt_only(request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
    request.stats.prompt_tokens = len(request.prompt_token_ids)
    for index in range(request.options.n):
        yield GenerationDelta(index=index, text="", token_ids=(), finish_reason="length")


def _continuous_usage(req: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.continuous_usage_stats)


def _chat_problems(req: ChatCompletionRequest) -> list[str]:
    problems = []
    if req.tools or req.functions:
        problems.append("tools (function calling) are not supported by this server")
    for i, message in enumerate(req.messages):
        kinds = message.non_text_parts()
        if kinds:
            problems.append(f"messages[{i}] has content parts of type {kinds}; only text is served")
    return problems


def _options(
    req: ChatCompletionRequest | CompletionRequest, *, max_tokens: int, logprobs: int | None
) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=max(req.top_p, _MIN_TOP_P),
        top_k=req.top_k,
        min_p=req.min_p,
        n=req.n,
        seed=req.seed,
        stop=req.stop_list(),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logprobs=logprobs,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logit_bias=req.token_bias(),
    )


def _with_response_format(options: SamplingOptions, req: ChatCompletionRequest) -> SamplingOptions:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return options
    if fmt.type == "json_object":
        return replace(options, json_object=True)
    if fmt.json_schema is None:  # the request model requires it; never an assert on a request
        raise InvalidRequestError(
            "response_format of type json_schema needs a json_schema", param="response_format"
        )
    return replace(options, json_schema=fmt.json_schema.schema_)
