"""OpenAI's response shapes: the whole body of a chat or text completion, and its SSE chunks.

Shapes follow OpenAI's published schemas (CreateChatCompletionResponse, ...StreamResponse,
CreateCompletionResponse): the message and the logprobs object carry `refusal: null`; with
`echo` a text completion's choices start with their prompt; `stream_options.include_usage` adds
a last chunk with the totals and `usage: null` on the others, `continuous_usage_stats` (vLLM's
extension) the usage so far on every chunk. Nothing here generates or knows HTTP.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from server.streams import Collected, Merged, openai_logprobs

if TYPE_CHECKING:
    from server.openai_service import Prepared


def usage(prepared: Prepared) -> dict:
    """Token counts so far (final once every engine stream has ended)."""
    prompt = sum(r.stats.prompt_tokens for r in prepared.requests)
    completion = sum(r.stats.completion_tokens for r in prepared.requests)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _echoed(prepared: Prepared, index: int) -> str:
    """The prompt text that choice `index` starts with (empty unless `echo`)."""
    if not prepared.echo:
        return ""
    return prepared.echo[index // prepared.requests[0].options.n]


def _message(text: str) -> dict:
    return {"role": "assistant", "content": text, "refusal": None}


def response_body(prepared: Prepared, collected: Collected) -> dict:
    chat = prepared.endpoint == "chat"
    choices = []
    for index in sorted(collected.text):
        choice: dict = {"index": index, "finish_reason": collected.finish[index]}
        if chat:
            choice["message"] = _message(collected.text[index])
        else:
            choice["text"] = _echoed(prepared, index) + collected.text[index]
        choice["logprobs"] = openai_logprobs(collected.logprobs.get(index), chat=chat)
        choices.append(choice)
    return {
        "id": prepared.response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": prepared.created,
        "model": prepared.target.served_as,
        "choices": choices,
        "usage": usage(prepared),
    }


async def sse_chunks(
    prepared: Prepared, merged: Merged, on_first_token: Callable[[], None]
) -> AsyncIterator[str]:
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
        text = delta.text if index in opened else _echoed(prepared, index) + delta.text
        choice: dict = {"index": index, "finish_reason": delta.finish_reason}
        logprobs = openai_logprobs(delta.logprobs, chat=chat) if delta.logprobs else None
        if chat:
            choice["delta"] = {"content": text}
            if index not in opened:
                choice["delta"]["role"] = "assistant"
        else:
            choice["text"] = text
        choice["logprobs"] = logprobs
        if text or delta.finish_reason or logprobs:
            opened.add(index)
            yield _event({**base, "choices": [choice], **_chunk_usage(prepared)})
    if prepared.include_usage:
        yield _event({**base, "choices": [], "usage": usage(prepared)})


def _chunk_usage(prepared: Prepared) -> dict:
    if prepared.continuous_usage:
        return {"usage": usage(prepared)}
    if prepared.include_usage:
        return {"usage": None}  # OpenAI: every chunk but the last has usage null
    return {}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
