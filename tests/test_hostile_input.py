"""Hostile or heavy input never stalls or kills the server: bounded bodies, headers and lists,
chat templates only from the operator, prompt work off the event loop, and no field accepted and
then silently ignored. A real uvicorn on loopback and the fake engine."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from server.app import create_app
from server.engine_fake import FakeEngine
from server.metrics import ServerMetrics
from server.protocol import MAX_MESSAGES, MAX_PROMPTS
from server.request_limits import MAX_HEADER_VALUE_BYTES
from server.targets import LocalAdapters
from tests.support.servers import ServerThread

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hello"}]


class RecordingEngine(FakeEngine):
    """The fake engine, remembering what it was asked to render; `SLOW` in a message makes the
    render take a while, synchronously, as a huge prompt does in a real tokenizer."""

    def __init__(self, **kwargs):
        # A context window no test reaches: a refusal must come from the bound under test.
        super().__init__(**{"max_model_len": 1_000_000, **kwargs})
        self.rendered: list[list[dict]] = []

    def render_chat(self, messages, **kwargs):
        self.rendered.append([dict(m) for m in messages])
        if any("SLOW" in m["content"] for m in messages):
            time.sleep(1.5)
        return super().render_chat(messages, **kwargs)

    def tokenize(self, text):
        text.encode("utf-8")  # as a real tokenizer must: a lone surrogate raises here
        return super().tokenize(text)


@pytest.fixture
def serve() -> Iterator:
    """Factory: a server on a fake engine, with create_app's own keyword arguments."""
    started: list[ServerThread] = []

    def make(engine: FakeEngine | None = None, **app_kwargs) -> ServerThread:
        engine = engine or RecordingEngine()
        metrics = ServerMetrics(CollectorRegistry())
        local = LocalAdapters(engine, base_name="fake", adapters={}, metrics=metrics)
        app = create_app(engine=engine, resolver=local, metrics=metrics, **app_kwargs)
        server = ServerThread(app).start(timeout=30)
        server.engine = engine
        started.append(server)
        server.wait_ready()
        return server

    yield make
    for server in started:
        server.stop()


def _error(response: httpx.Response, status: int, *, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert param in (error["param"] or "") or param in error["message"], error
    return error


def _post(server, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30, **kwargs)


def _raw(server, request: bytes) -> bytes:
    """Send bytes as they are (no client library to tidy them up) and read the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# -- chat templates belong to the operator ------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, refused",
    [
        ({"chat_template": "{{ 'owned' }}"}, "chat_template"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"add_generation_prompt": False}, "add_generation_prompt"),
        ({"enable_thinking": {"nested": "object"}}, "enable_thinking"),
    ],
)
def test_chat_template_kwargs_outside_the_allow_list_are_400(serve, kwargs, refused):
    server = serve()
    r = _post(server, CHAT, {"model": "fake", "messages": USER, "chat_template_kwargs": kwargs})
    error = _error(r, 400, param="chat_template_kwargs")
    assert refused in error["message"]
    assert server.engine.rendered == []  # never reached the template


def test_allowed_chat_template_kwargs_reach_the_template(serve):
    server = serve()
    body = {"model": "fake", "messages": USER, "chat_template_kwargs": {"enable_thinking": False}}
    assert _post(server, CHAT, body).status_code == 200


# -- prompt work off the event loop -------------------------------------------------------------


def test_a_slow_render_does_not_stall_other_requests(serve):
    server = serve(engine=RecordingEngine())
    slow = {"model": "fake", "messages": [{"role": "user", "content": "SLOW " * 10}]}
    worker = threading.Thread(target=_post, args=(server, CHAT, slow))
    worker.start()
    try:
        time.sleep(0.3)  # the slow render is under way
        started = time.perf_counter()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        models = httpx.get(f"{server.url}/v1/models", timeout=10)
        waited = time.perf_counter() - started
    finally:
        worker.join()
    assert models.status_code == 200
    assert waited < 0.6, f"the event loop was blocked for {waited:.2f} s"


@pytest.mark.parametrize(
    "path, body",
    [
        (CHAT, {"messages": [{"role": "user", "content": "a\ud800b"}]}),
        (COMPLETIONS, {"prompt": "\udfff"}),
    ],
)
def test_text_the_tokenizer_cannot_encode_is_400(serve, path, body):
    server = serve()
    raw = json.dumps({"model": "fake", **body})  # ASCII-escaped: JSON may hold lone surrogates
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"})
    assert "could not be tokenized" in _error(r, 400)["message"]


# -- bounded bodies -----------------------------------------------------------------------------


def _big_chat(size: int) -> bytes:
    return json.dumps({"model": "fake", "messages": [{"role": "user", "content": "x" * size}]})


def test_body_over_the_limit_is_413_in_openai_shape(serve):
    server = serve(max_request_bytes=64 * 1024)
    r = httpx.post(
        server.url + CHAT, content=_big_chat(100_000), headers={"content-type": "application/json"}
    )
    error = _error(r, 413)
    assert "65536" in error["message"] and error["code"] == "request_too_large"


def test_chunked_body_over_the_limit_is_413(serve):
    server = serve(max_request_bytes=64 * 1024)
    body = _big_chat(200_000).encode()

    def chunks():  # a generator body: httpx sends it chunked, with no content-length
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    r = httpx.post(
        server.url + CHAT, content=chunks(), headers={"content-type": "application/json"}
    )
    _error(r, 413)


def test_chunked_body_under_the_limit_is_served(serve):
    server = serve(max_request_bytes=64 * 1024)
    body = _big_chat(1000).encode()
    r = httpx.post(
        server.url + CHAT,
        content=iter([body[:100], body[100:]]),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200, r.text


def test_max_request_bytes_is_a_serve_setting():
    from server.settings import ServeSettings

    assert ServeSettings(max_request_bytes=2048).max_request_bytes == 2048
    assert ServeSettings().max_request_bytes == 4 * 1024**2


@pytest.mark.parametrize(
    "path, body, param",
    [
        (CHAT, {"messages": USER * (MAX_MESSAGES + 1)}, "messages"),
        (CHAT, {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (CHAT, {"messages": USER, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        (CHAT, {"messages": USER, "logit_bias": {"5": 101}}, "logit_bias"),
        (CHAT, {"messages": USER, "logit_bias": {"word": 1}}, "logit_bias"),
        (COMPLETIONS, {"prompt": ["a"] * (MAX_PROMPTS + 1)}, "prompt"),
        (COMPLETIONS, {"prompt": ["a"] * 10, "n": 20}, "choices"),
        (COMPLETIONS, {"prompt": [1, -5]}, "prompt"),
        (COMPLETIONS, {"prompt": "a", "seed": 2**70}, "seed"),
    ],
)
def test_client_controlled_lists_are_bounded(serve, path, body, param):
    server = serve()
    _error(_post(server, path, {"model": "fake", **body}), 400, param=param)


# -- no field accepted and then ignored ---------------------------------------------------------


def test_echo_prepends_the_prompt(serve):
    server = serve()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    result = client.completions.create(model="fake", prompt="once upon", max_tokens=2, echo=True)
    assert result.choices[0].text == "once uponthe quick"
    only = client.completions.create(model="fake", prompt="once upon", max_tokens=0, echo=True)
    assert only.choices[0].text == "once upon" and only.usage.completion_tokens == 0
    stream = client.completions.create(
        model="fake", prompt=["a", "b"], max_tokens=2, echo=True, stream=True
    )
    texts: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {0: "athe quick", 1: "bthe quick"}


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"prompt": "a", "echo": True, "logprobs": 1}, "echo with logprobs"),
        ({"prompt": [1, 2], "echo": True}, "echo needs text prompts"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens 0"),
    ],
)
def test_echo_that_cannot_be_honoured_is_400(serve, body, fragment):
    server = serve()
    assert fragment in _error(_post(server, COMPLETIONS, {"model": "fake", **body}), 400)["message"]


def test_continuous_usage_stats_put_usage_on_every_chunk(serve):
    server = serve()
    body = {
        "model": "fake",
        "messages": USER,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with httpx.stream("POST", server.url + CHAT, json=body) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    content = [c for c in chunks if c["choices"]]
    assert [c["usage"]["completion_tokens"] for c in content] == [1, 2, 3]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 3


def test_usage_is_null_on_all_but_the_last_chunk_with_include_usage(serve):
    server = serve()
    body = {"model": "fake", "messages": USER, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", server.url + CHAT, json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]


def test_message_name_reaches_the_chat_template(serve):
    server = serve()
    messages = [{"role": "user", "content": "hi", "name": "alice"}]
    assert _post(server, CHAT, {"model": "fake", "messages": messages}).status_code == 200
    assert server.engine.rendered[-1] == [{"role": "user", "content": "hi", "name": "alice"}]


@pytest.mark.parametrize(
    "choice", ["auto", "required", {"type": "function", "function": {"name": "f"}}]
)
def test_tool_choice_without_tools_is_400(serve, choice):
    server = serve()
    _error(_post(server, CHAT, {"model": "fake", "messages": USER, "tool_choice": choice}), 400,
           param="tool_choice")  # fmt: skip


def test_tool_choice_none_without_tools_is_served(serve):
    server = serve()
    body = {"model": "fake", "messages": USER, "tool_choice": "none"}
    assert _post(server, CHAT, body).status_code == 200


# -- values OpenAI's description allows ---------------------------------------------------------


def test_null_means_the_default(serve):
    server = serve()
    nulls = dict.fromkeys(
        ["temperature", "top_p", "frequency_penalty", "presence_penalty", "n", "stream", "stop",
         "seed", "logit_bias", "stream_options", "max_tokens"]
    )  # fmt: skip
    chat = _post(server, CHAT, {"model": "fake", "messages": USER, "logprobs": None, **nulls})
    assert chat.status_code == 200, chat.text
    text = _post(server, COMPLETIONS, {"model": "fake", "prompt": None, "echo": None,
                                       "logprobs": None, "best_of": None, "suffix": None, **nulls})  # fmt: skip
    assert text.status_code == 200, text.text
    options = server.engine.requests[-1].options
    assert options.temperature == 1.0 and options.max_tokens == 16


def test_top_p_zero_is_served_as_the_most_likely_token(serve):
    server = serve()
    assert _post(server, CHAT, {"model": "fake", "messages": USER, "top_p": 0}).status_code == 200
    assert 0 < server.engine.requests[-1].options.top_p < 1e-6


def test_empty_prompt_and_empty_stop_strings(serve):
    server = serve()
    r = _post(server, COMPLETIONS, {"model": "fake", "prompt": "", "stop": ["", "lazy"]})
    assert r.status_code == 200, r.text
    request = server.engine.requests[-1]
    assert request.options.stop == ("lazy",) and len(request.prompt_token_ids) > 0


# -- garbage headers ----------------------------------------------------------------------------


def test_non_ascii_authorization_is_401(serve):
    server = serve(api_keys=["secret"])
    body = b'{"model":"fake","messages":[{"role":"user","content":"x"}]}'
    answer = _raw(
        server,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xc3\xa9\xff\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (len(body), body),
    )
    assert _status(answer) == 401


@pytest.mark.parametrize("value", [b"abc", b"-5", b"1e3", b"12, 13"])
def test_non_integer_content_length_is_4xx(serve, value):
    server = serve()
    answer = _raw(
        server,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + value + b"\r\nConnection: close\r\n\r\n{}",
    )
    assert 400 <= _status(answer) < 500, answer[:200]


@pytest.mark.parametrize("path", ["/admin/adapters", "/v1/models"])
def test_a_10_kb_header_is_431(serve, path):
    server = serve(admin_key="admin")
    headers = {"Authorization": "Bearer admin", "x-loraplex-actor": "a" * 10_000}
    error = _error(httpx.get(server.url + path, headers=headers), 431)
    assert error["param"] == "x-loraplex-actor"
    fine = {"Authorization": "Bearer admin", "x-loraplex-actor": "a" * (MAX_HEADER_VALUE_BYTES - 1)}
    assert httpx.get(server.url + "/v1/models", headers=fine).status_code == 200
