"""The HTTP contract on a fake engine: OpenAI-shaped errors with the right status, every problem
reported at once, auth, readiness, SSE framing. Fast: no model involved."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from server.engine_fake import FakeEngine


def _client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def _assert_openai_error(response: httpx.Response, status: int, *, code=None, param=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def test_unknown_model_is_404_listing_valid_names(fake_server):
    server = fake_server(adapters={"support": "good/support"})
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
    )
    error = _assert_openai_error(r, 404, code="model_not_found", param="model")
    assert "fake" in error["message"] and "support" in error["message"]


def test_malformed_json_is_400(fake_server):
    server = fake_server()
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b'{"model": "fake", "messages": [',
        headers={"content-type": "application/json"},
    )
    error = _assert_openai_error(r, 400)
    assert "not valid JSON" in error["message"]


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"model": "fake"}, "messages: Field required"),
        ({"model": "fake", "messages": []}, "messages"),
        ({"model": "fake", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model: Field required"),
    ],
)
def test_bad_chat_bodies_are_400_not_422(fake_server, body, fragment):
    server = fake_server()
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    error = _assert_openai_error(r, 400)
    assert fragment in error["message"]


def test_every_problem_is_reported_at_once(fake_server):
    server = fake_server()
    body = {
        "model": "fake",
        "messages": [{"role": "user", "content": "x"}],
        "temperature": 9,
        "top_p": 1.5,
        "n": 0,
        "max_tokens": -1,
    }
    error = _assert_openai_error(httpx.post(f"{server.url}/v1/chat/completions", json=body), 400)
    assert "4 problems" in error["message"]
    for field in ("temperature", "top_p", "n", "max_tokens"):
        assert field in error["message"]


@pytest.mark.parametrize("max_tokens", [0, 10_000])
def test_max_tokens_out_of_range_is_400(fake_server, max_tokens):
    server = fake_server()
    with pytest.raises(openai.BadRequestError) as info:
        _client(server).chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "x"}], max_tokens=max_tokens
        )
    assert "max_tokens" in str(info.value)


def test_prompt_longer_than_context_is_400(fake_server):
    server = fake_server()
    with pytest.raises(openai.BadRequestError) as info:
        _client(server).completions.create(model="fake", prompt="word " * 1000)
    assert info.value.code == "context_length_exceeded"


def test_unsupported_features_are_named(fake_server):
    server = fake_server()
    body = {
        "model": "fake",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    error = _assert_openai_error(httpx.post(f"{server.url}/v1/chat/completions", json=body), 400)
    assert "tools" in error["message"] and "image_url" in error["message"]


def test_unknown_route_is_openai_shaped_404(fake_server):
    server = fake_server()
    _assert_openai_error(httpx.get(f"{server.url}/v1/nothing"), 404)


def test_api_keys_guard_inference_but_not_health(fake_server):
    server = fake_server(api_keys=["secret"])
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").models.list()
    assert [m.id for m in _client(server, key="secret").models.list()] == ["fake"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    _assert_openai_error(httpx.get(f"{server.url}/v1/models"), 401)


def test_not_ready_is_503_while_the_engine_starts(fake_server):
    server = fake_server(engine=FakeEngine(start_delay=3), wait=False)
    assert httpx.get(f"{server.url}/health").status_code == 200
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 503 and "starting" in ready.json()["reason"]
    body = {"model": "fake", "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    _assert_openai_error(r, 503, code="engine_not_ready")
    server.wait_ready(timeout=30)
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body).status_code == 200


def test_bad_adapter_fails_startup_with_the_reason(fake_server):
    server = fake_server(adapters={"broken": "bad/folder"}, wait=False)
    with pytest.raises(RuntimeError, match="broken"):
        server.wait_ready(timeout=10)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_adapter_request_says_what_served_it(fake_server):
    server = fake_server(adapters={"support": "good/support"})
    raw = _client(server).chat.completions.with_raw_response.create(
        model="support", messages=[{"role": "user", "content": "x"}]
    )
    completion = raw.parse()
    assert raw.headers["x-loraplex-adapter"] == "support"
    assert completion.model == "support"
    assert completion.choices[0].message.content.startswith("[support]")


def test_sse_stream_framing_and_usage(fake_server):
    server = fake_server()
    body = {
        "model": "fake",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "n": 2,
        "max_tokens": 3,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    by_choice: dict[int, str] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        by_choice[choice["index"]] = by_choice.get(choice["index"], "") + choice["delta"]["content"]
    assert by_choice == {0: "the quick brown", 1: "the quick brown"}
    first_of_each = {c["choices"][0]["index"]: c for c in reversed(chunks[:-1])}
    assert all(c["choices"][0]["delta"]["role"] == "assistant" for c in first_of_each.values())


def test_completions_with_several_prompts_number_choices(fake_server):
    server = fake_server()
    result = _client(server).completions.create(
        model="fake", prompt=["a b", "c d"], n=2, max_tokens=2, stop=["brown"]
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert {c.text for c in result.choices} == {"the quick"}
    assert result.choices[0].finish_reason == "length"


def test_metrics_count_requests_with_bounded_labels(fake_server):
    server = fake_server()
    client = _client(server)
    client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="user-made-up-name", messages=[{"role": "user", "content": "x"}]
        )
    text = httpx.get(f"{server.url}/metrics").text
    assert 'loraplex_requests_total{endpoint="chat",model="fake",status="200"} 1.0' in text
    assert 'loraplex_requests_total{endpoint="chat",model="unknown",status="404"} 1.0' in text
    assert "user-made-up-name" not in text
    assert "loraplex_time_to_first_token_seconds_count" in text


@pytest.mark.parametrize("stream", [False, True])
def test_overload_is_429_before_any_stream_starts(fake_server, stream):
    server = fake_server(engine=FakeEngine(token_delay=0.3, max_in_flight=1))
    body = {"model": "fake", "messages": [{"role": "user", "content": "x"}]}
    busy = threading.Thread(
        target=httpx.post, args=(f"{server.url}/v1/chat/completions",), kwargs={"json": body}
    )
    busy.start()
    try:
        time.sleep(0.15)
        r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": stream})
        _assert_openai_error(r, 429, code="overloaded")
    finally:
        busy.join()
