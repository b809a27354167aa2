"""Send one request and time it over httpx (pooled keep-alive connections), SSE parsed by hand.

Owns the per-request record (timestamps from `time.perf_counter`, status, tokens, served
adapter/variant headers). Does not decide what to send or when (workload, runner) and does not
aggregate (stats). The official `openai` client is deliberately not used: its per-request
overhead caps the generator far below the rates it must drive.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field

import httpx

from loadtest.workload import CHAT, RequestSpec

ADAPTER_HEADER = "x-loraplex-adapter"
VARIANT_HEADER = "x-loraplex-variant"
CANCELLED = "cancelled"
POOL_SHARD = 1  # connections per httpx client; see OpenAIHTTPClient


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. Times are `perf_counter` seconds; `ttft` etc. are durations."""

    index: int
    model: str
    user: str | None = None
    max_tokens: int = 0
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    chunks: int = 0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    token_source: str = ""  # "usage" (server counted) | "chunks" (one per content chunk) | ""
    status: int = 0  # HTTP status; 0 when no response arrived
    error: str = ""  # "" when the request succeeded
    served_adapter: str = ""
    served_variant: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def cancelled(self) -> bool:
        return self.error == CANCELLED

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """(e2e - ttft) / (output_tokens - 1): decode time per token after the first."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def api_base(url: str) -> str:
    """`http://host:8000` and `http://host:8000/v1` both mean the same OpenAI API root."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


class OpenAIHTTPClient:
    """Posts `RequestSpec`s to an OpenAI-compatible server through one connection pool."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int,
        stream: bool = True,
        timeout: float = 600.0,
        api_key: str | None = None,
    ) -> None:
        self.base = api_base(url)
        self.stream = stream
        headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        # httpcore's pool scans every connection (and polls each idle socket) on every request and
        # release, quadratically in places (encode/httpcore#1035): one client with 64 connections
        # managed ~900 req/s on one core. So each httpx client holds POOL_SHARD connections and
        # clients are added as concurrency grows, up to `max_connections` connections in all.
        # They share one TLS context, which is the expensive part of making a client.
        self._headers = headers
        self._per_shard = min(POOL_SHARD, max_connections)
        self._max_shards = max(1, -(-max_connections // self._per_shard))
        self._limits = httpx.Limits(
            max_connections=self._per_shard, max_keepalive_connections=self._per_shard
        )
        self._timeouts = httpx.Timeout(timeout, connect=30.0)
        self._tls = ssl.create_default_context()
        self._shards: list[httpx.AsyncClient] = []
        self._busy: list[int] = []  # requests in flight per shard
        self._free: list[int] = []  # shards with a spare connection
        self._urls = {
            CHAT: f"{self.base}/chat/completions",
            "completions": f"{self.base}/completions",
        }

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()

    def _acquire(self) -> int:
        busy = self._busy
        if self._free:
            shard = self._free[-1]
            busy[shard] += 1
            if busy[shard] >= self._per_shard:
                self._free.pop()
            return shard
        if len(self._shards) < self._max_shards:
            self._shards.append(
                httpx.AsyncClient(
                    headers=self._headers,
                    limits=self._limits,
                    timeout=self._timeouts,
                    verify=self._tls,
                )
            )
            busy.append(1)
            if self._per_shard > 1:
                self._free.append(len(busy) - 1)
            return len(busy) - 1
        shard = busy.index(min(busy))  # all full: queue on the least busy
        busy[shard] += 1
        return shard

    def _release(self, shard: int) -> None:
        self._busy[shard] -= 1
        if self._busy[shard] == self._per_shard - 1:
            self._free.append(shard)

    async def send(self, spec: RequestSpec, record: RequestRecord) -> None:
        """Fill `record` in place, so a cancelled request still leaves what it measured."""
        body = dict(spec.body)
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        content = json.dumps(body).encode()
        shard = self._acquire()
        record.start = time.perf_counter()
        try:
            async with self._shards[shard].stream(
                "POST", self._urls[spec.endpoint], content=content
            ) as response:
                record.status = response.status_code
                headers = response.headers
                record.served_adapter = headers.get(ADAPTER_HEADER, "")
                record.served_variant = headers.get(VARIANT_HEADER, "")
                if response.status_code != 200:
                    record.error = _error_message(await response.aread(), response.status_code)
                elif self.stream:
                    await _read_stream(response, record)
                else:
                    _read_json(await response.aread(), record)
        except asyncio.CancelledError:
            record.error = CANCELLED
            raise
        except httpx.TimeoutException:
            record.error = "timeout"
        except httpx.HTTPError as e:
            record.error = type(e).__name__
        finally:
            record.end = time.perf_counter()
            self._release(shard)


async def _read_stream(response: httpx.Response, record: RequestRecord) -> None:
    """Server-sent events: one `data:` line per event; chunks that arrive together share a time."""
    start, last = record.start, 0.0
    usage_tokens: int | None = None
    buffer = b""
    done = False
    async for block in response.aiter_bytes():
        now = time.perf_counter()
        buffer += block
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            try:
                event = json.loads(payload)
            except ValueError:
                record.error = "bad_sse"
                continue
            if "error" in event:
                record.error = "stream_error"
                continue
            choices = event.get("choices")
            if choices and _has_content(choices[0]):
                if record.ttft is None:
                    record.ttft = now - start
                else:
                    record.itls.append(now - last)
                last = now
                record.chunks += 1
            usage = event.get("usage")
            if usage:
                usage_tokens = usage.get("completion_tokens", usage_tokens)
                record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
    # The stream is read to its end (not left at [DONE]) so the connection goes back to the pool.
    if not done and not record.error:
        record.error = "incomplete_stream"
    if usage_tokens is not None:
        record.output_tokens, record.token_source = usage_tokens, "usage"
    else:
        record.output_tokens, record.token_source = record.chunks, "chunks"


def _has_content(choice: dict) -> bool:
    delta = choice.get("delta")
    if delta is not None:
        return bool(delta.get("content") or delta.get("reasoning_content"))
    return bool(choice.get("text"))


def _read_json(raw: bytes, record: RequestRecord) -> None:
    try:
        usage = json.loads(raw).get("usage") or {}
    except ValueError:
        record.error = "bad_json"
        return
    if "completion_tokens" in usage:
        record.output_tokens, record.token_source = usage["completion_tokens"], "usage"
    record.prompt_tokens = usage.get("prompt_tokens")


def _error_message(raw: bytes, status: int) -> str:
    try:
        error = json.loads(raw).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return str(message or raw[:200].decode(errors="replace") or f"HTTP {status}")[:300]
