"""Chat and text completions: OpenAI request in, engine stream through, OpenAI response out.

Owns prompt preparation (chat template via the engine, context-length checks), the mapping of
request fields to `SamplingOptions`, and the shapes of responses and SSE chunks. It does not know
FastAPI: routes in `server.api` call it and turn its results into HTTP responses.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from server.engine import Engine, GenerationDelta, GenerationRequest, SamplingOptions
from server.errors import ContextLengthError, InvalidRequestError, LoraplexError, error_body
from server.metrics import ServerMetrics
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.streams import Collected, Merged, collect, merge_streams, openai_logprobs
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


class CompletionService:
    def __init__(self, engine: Engine, resolver: ModelResolver, metrics: ServerMetrics):
        self._engine = engine
        self._resolver = resolver
        self._metrics = metrics

    # -- preparation --------------------------------------------------------------------------

    async def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        started = time.perf_counter()
        problems = _chat_problems(req)
        if problems:
            raise InvalidRequestError("; ".join(problems), param="messages")
        target = await self._resolver.resolve(req.model)
        try:
            return self._prepare_chat(req, target, started)
        except BaseException:
            target.done()
            raise

    def _prepare_chat(self, req: ChatCompletionRequest, target: Target, started: float) -> Prepared:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt = self._engine.render_chat(
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
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )

    async def prepare_completion(self, req: CompletionRequest) -> Prepared:
        started = time.perf_counter()
        target = await self._resolver.resolve(req.model)
        try:
            return self._prepare_completion(req, target, started)
        except BaseException:
            target.done()
            raise

    def _prepare_completion(
        self, req: CompletionRequest, target: Target, started: float
    ) -> Prepared:
        prompts = [p if isinstance(p, list) else self._engine.tokenize(p) for p in req.prompts()]
        if any(len(p) == 0 for p in prompts):
            raise InvalidRequestError("prompt must not be empty", param="prompt")
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
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )

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
        streams = [self._engine.generate(r) for r in prepared.requests]
        return merge_streams(streams, choices_per_stream=n)

    async def complete(self, prepared: Prepared) -> dict:
        """Run to the end and return the whole OpenAI response body."""
        status = 500
        self._metrics.in_flight.inc()
        try:
            collected = await collect(self._merged(prepared), on_first_token=self._ttft(prepared))
            status = 200
            return self._body(prepared, collected)
        except LoraplexError as e:
            status = error_body(e)[0]
            raise
        finally:
            self._observe(prepared, status)

    async def open_stream(self, prepared: Prepared) -> AsyncIterator[str]:
        """Start generating and wait for the first delta, so that a refusal (overload, bad
        parameters) is still an HTTP status; then hand over the SSE lines."""
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
        return self._stream(prepared, merged, first)

    async def _stream(
        self, prepared: Prepared, merged: Merged, first: tuple[int, GenerationDelta] | None
    ) -> AsyncIterator[str]:
        """SSE `data:` lines, ending with `[DONE]`; an error mid-stream becomes an error event."""
        status = 500
        try:
            stream = _prepend(first, merged)
            async for chunk in _sse_chunks(prepared, stream, self._ttft(prepared)):
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
                self._metrics.ttft.labels(prepared.target.served_as).observe(elapsed)

        return on_first_token

    def _observe(self, prepared: Prepared, status: int) -> None:
        """Once per request, when it ends: metrics, and the adapter lease is returned."""
        prepared.target.done()
        self._metrics.in_flight.dec()
        self._metrics.observe_request(
            model=prepared.target.served_as,
            endpoint=prepared.endpoint,
            status=status,
            seconds=time.perf_counter() - prepared.started,
            prompt_tokens=sum(r.stats.prompt_tokens for r in prepared.requests),
            generation_tokens=sum(r.stats.completion_tokens for r in prepared.requests),
        )

    def _body(self, prepared: Prepared, collected: Collected) -> dict:
        chat = prepared.endpoint == "chat"
        choices = []
        for index in sorted(collected.text):
            choice: dict = {"index": index, "finish_reason": collected.finish[index]}
            logprobs = openai_logprobs(collected.logprobs.get(index), chat=chat)
            if chat:
                choice["message"] = {"role": "assistant", "content": collected.text[index]}
            else:
                choice["text"] = collected.text[index]
            choice["logprobs"] = logprobs
            choices.append(choice)
        return {
            "id": prepared.response_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": prepared.created,
            "model": prepared.target.served_as,
            "choices": choices,
            "usage": _usage(prepared),
        }


async def _prepend(first: tuple[int, GenerationDelta] | None, rest: Merged) -> Merged:
    if first is not None:
        yield first
        async for item in rest:
            yield item


def _chat_problems(req: ChatCompletionRequest) -> list[str]:
    problems = []
    if req.tools:
        problems.append("tools are not supported by this server")
    for i, message in enumerate(req.messages):
        kinds = message.non_text_parts()
        if kinds:
            problems.append(f"messages[{i}] has content parts of type {kinds}; only text is served")
    return problems


def _options(
    req: ChatCompletionRequest | CompletionRequest, *, max_tokens: int, logprobs: int | None
) -> SamplingOptions:
    bias = None
    if req.logit_bias:
        try:
            bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        except ValueError as e:
            raise InvalidRequestError(
                "logit_bias keys must be token ids", param="logit_bias"
            ) from e
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
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
        logit_bias=bias,
    )


def _with_response_format(options: SamplingOptions, req: ChatCompletionRequest) -> SamplingOptions:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return options
    if fmt.type == "json_object":
        return replace(options, json_object=True)
    assert fmt.json_schema is not None  # checked by the request model
    return replace(options, json_schema=fmt.json_schema.schema_)


def _usage(prepared: Prepared) -> dict:
    prompt = sum(r.stats.prompt_tokens for r in prepared.requests)
    completion = sum(r.stats.completion_tokens for r in prepared.requests)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _sse_chunks(prepared: Prepared, merged: Merged, on_first_token) -> AsyncIterator[str]:
    chat = prepared.endpoint == "chat"
    base = {
        "id": prepared.response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": prepared.created,
        "model": prepared.target.served_as,
    }
    opened: set[int] = set()
    async for index, delta in merged:
        if delta.token_ids:
            on_first_token()
        choice: dict = {"index": index, "finish_reason": delta.finish_reason}
        logprobs = openai_logprobs(delta.logprobs, chat=chat) if delta.logprobs else None
        if chat:
            choice["delta"] = {"content": delta.text}
            if index not in opened:
                choice["delta"]["role"] = "assistant"
        else:
            choice["text"] = delta.text
        choice["logprobs"] = logprobs
        if delta.text or delta.finish_reason or logprobs:
            opened.add(index)
            yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
    if prepared.include_usage:
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': _usage(prepared)})}\n\n"
