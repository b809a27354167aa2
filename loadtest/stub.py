"""A tiny OpenAI-compatible server for tests and generator benchmarks (raw asyncio, HTTP/1.1).

Streams `tokens` content chunks with a fixed time to first token and inter-token gap, honours
`stream_options.include_usage`, sets `x-loraplex-adapter`, and fails chosen requests with a chosen
status. Not a model and not loraplex: it exists so the generator's numbers can be checked against
known delays and its own speed measured (`python -m loadtest.stub --port 8100`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

FailRule = Callable[[int, dict], int | None]  # (request number from 0, body) -> status or None
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests"}


@dataclass(frozen=True)
class StubBehaviour:
    ttft: float = 0.0  # seconds before the first content chunk
    itl: float = 0.0  # seconds between content chunks
    tokens: int | None = None  # chunks per answer; None: the request's max_tokens
    usage: bool = True  # send a usage chunk when the client asks for one
    variant: str = ""  # x-loraplex-variant to report, if any
    fail: FailRule | None = None


class StubServer:
    """Runs on its own event loop in a daemon thread; `url` is the API root without `/v1`."""

    def __init__(self, behaviour: StubBehaviour | None = None, *, port: int = 0) -> None:
        self.behaviour = behaviour or StubBehaviour()
        self.port = port
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadtest-stub", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> StubServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("stub server did not start in 10 s")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(self.serve())
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    async def serve(self) -> asyncio.Server:
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, backlog=4096)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = line.split(" ", 2)
                length = 0
                for h in header_lines:
                    if h[:15].lower() == "content-length:":
                        length = int(h[15:])
                body = json.loads(await reader.readexactly(length)) if length else {}
                await self._respond(method, path, body, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _respond(self, method: str, path: str, body: dict, w: asyncio.StreamWriter) -> None:
        b = self.behaviour
        number = self.requests
        self.requests += 1
        if method == "GET" and path == "/v1/models":
            return _send_json(w, 200, {"object": "list", "data": []})
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            return _send_json(w, 404, {"error": {"message": f"no route {method} {path}"}})
        status = b.fail(number, body) if b.fail else None
        if status:
            message = {"error": {"message": f"stub failure {status}", "code": status}}
            return _send_json(w, status, message)
        model = body.get("model", "stub")
        tokens = b.tokens if b.tokens is not None else int(body.get("max_tokens") or 16)
        chat = path.endswith("chat/completions")
        headers = f"x-loraplex-adapter: {model}@1\r\n"
        if b.variant:
            headers += f"x-loraplex-variant: {b.variant}\r\n"
        usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}
        if not body.get("stream"):
            if b.ttft or b.itl:
                await asyncio.sleep(b.ttft + b.itl * max(tokens - 1, 0))
            return _send_json(w, 200, {"model": model, "usage": usage}, headers)
        w.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n" + headers.encode() + b"\r\n"
        )
        if b.ttft:
            await w.drain()
            await asyncio.sleep(b.ttft)
        for i in range(tokens):
            if i and b.itl:
                await w.drain()
                await asyncio.sleep(b.itl)
            choice = (
                {"index": 0, "delta": {"content": "tok "}} if chat else {"index": 0, "text": "tok "}
            )
            _chunk(w, {"model": model, "choices": [choice]})
        if b.usage and (body.get("stream_options") or {}).get("include_usage"):
            _chunk(w, {"model": model, "choices": [], "usage": usage})
        w.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        await w.drain()


def _chunk(w: asyncio.StreamWriter, event: dict) -> None:
    data = b"data: " + json.dumps(event).encode() + b"\n\n"
    w.write(b"%x\r\n%s\r\n" % (len(data), data))


def _send_json(w: asyncio.StreamWriter, status: int, payload: dict, headers: str = "") -> None:
    data = json.dumps(payload).encode()
    reason = _REASONS.get(status, "Error")
    w.write(
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n{headers}\r\n".encode()
        + data
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Stub OpenAI-compatible streaming server.")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--itl-ms", type=float, default=0.0)
    parser.add_argument("--tokens", type=int, default=None)
    args = parser.parse_args()
    behaviour = StubBehaviour(ttft=args.ttft_ms / 1000, itl=args.itl_ms / 1000, tokens=args.tokens)
    stub = StubServer(behaviour, port=args.port)

    async def forever() -> None:
        await stub.serve()
        print(f"stub listening on {stub.url}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(forever())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
