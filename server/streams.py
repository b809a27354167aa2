"""Combining and collecting engine delta streams, and OpenAI's logprobs shapes.

A text-completion request with several prompts runs one engine request per prompt; their deltas
are merged into one stream whose choice indices are `prompt * n + choice`, as OpenAI numbers them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.engine import GenerationDelta, TokenLogprob

Merged = AsyncIterator[tuple[int, GenerationDelta]]
_DONE = object()


async def merge_streams(
    streams: list[AsyncIterator[GenerationDelta]], *, choices_per_stream: int
) -> Merged:
    if len(streams) == 1:  # the common case: no tasks, no queue
        async for delta in streams[0]:
            yield delta.index, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(offset: int, stream: AsyncIterator[GenerationDelta]) -> None:
        try:
            async for delta in stream:
                await queue.put((offset + delta.index, delta))
            await queue.put(_DONE)
        except Exception as e:  # handed to the consumer, which re-raises it
            await queue.put(e)

    tasks = [asyncio.create_task(pump(i * choices_per_stream, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:  # a client that went away aborts every engine request
            task.cancel()


@dataclass(slots=True)
class Collected:
    text: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)


async def collect(merged: Merged, *, on_first_token: Callable[[], None]) -> Collected:
    parts: dict[int, list[str]] = {}
    out = Collected()
    async for index, delta in merged:
        if delta.token_ids:
            on_first_token()
        parts.setdefault(index, []).append(delta.text)
        if delta.logprobs:
            out.logprobs.setdefault(index, []).extend(delta.logprobs)
        if delta.finish_reason is not None:
            out.finish[index] = delta.finish_reason
    for index, chunks in parts.items():
        out.text[index] = "".join(chunks)
        out.finish.setdefault(index, None)
    return out


def openai_logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...] | None, *, chat: bool):
    """Chat: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}; completions:
    parallel lists."""
    if items is None:
        return None
    if chat:
        return {
            "content": [
                {
                    "token": t.token,
                    "logprob": t.logprob,
                    "bytes": list(t.token.encode()),
                    "top_logprobs": [
                        {"token": s, "logprob": lp, "bytes": list(s.encode())} for s, lp in t.top
                    ],
                }
                for t in items
            ],
            "refusal": None,
        }
    offsets, position = [], 0
    for t in items:
        offsets.append(position)
        position += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [dict(t.top) for t in items],
        "text_offset": offsets,
    }
