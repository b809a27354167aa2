"""Conformance to OpenAI's published API description: requests generated from OpenAI's request
schemas, answers checked against its response schemas (tests/conformance/harness.py). Most runs
use the fake engine; a small sample runs on the real one. `tests/conformance/report.py` prints
the figures for a larger run."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from server.engine import GenerationDelta, GenerationRequest, SamplingOptions, TokenLogprob
from server.openai_service import Prepared
from server.responses import response_body, sse_chunks
from server.streams import Collected
from tests.conformance.harness import Tally, check_models, run_cases, source, validator
from tests.conformance.servers import conformance_fake_server

# Fewer than report.py: hypothesis-jsonschema takes ~0.4 s to draw one case from these schemas.
CASES = 25
# What the full run gave (report.py, 300 cases each): chat 97 %, completions 51 % (most of the
# rest: token ids no vocabulary has, which the schema allows). The floors catch a regression.
FLOOR = {"chat": 0.85, "completions": 0.35}


def _assert_clean(tally: Tally) -> None:
    assert tally.server_errors == 0, tally.violations
    assert tally.violations == [], "\n".join(tally.violations[:10])


@pytest.fixture(scope="module")
def fake_conformance():
    with conformance_fake_server() as served:
        yield served


def test_the_subset_says_where_it_came_from():
    origin = source()
    assert origin["from"].startswith("https://github.com/openai/openai-openapi")
    assert len(origin["commit"]) == 40 and origin["spec_version"]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_generated_requests_conform_on_the_fake_engine(fake_conformance, endpoint):
    url, models = fake_conformance
    tally = run_cases(url, endpoint, cases=CASES, models=models)
    _assert_clean(tally)
    assert tally.share_ok() >= FLOOR[endpoint], tally.reasons.most_common()


def test_the_model_list_conforms(fake_conformance):
    url, _ = fake_conformance
    tally = Tally()
    with httpx.Client(base_url=url) as client:
        check_models(client, tally)
    assert tally.ok == 1
    _assert_clean(tally)


def _prepared(endpoint: str, *, echo: list[str] | None = None) -> Prepared:
    class Served:
        served_as = "fake"

    request = GenerationRequest("r", [1, 2], SamplingOptions(max_tokens=2, logprobs=1))
    request.stats.prompt_tokens, request.stats.completion_tokens = 2, 2
    return Prepared(Served(), [request], endpoint, "id-1", 1, 0.0, True, echo=echo)


TOKENS = [TokenLogprob("hi", 5, -0.1, (("hi", -0.1),)), TokenLogprob(" there", 6, -0.7)]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_bodies_with_logprobs_validate(endpoint):
    collected = Collected(text={0: "hi there"}, finish={0: "length"}, logprobs={0: TOKENS})
    body = response_body(_prepared(endpoint), collected)
    name = "CreateChatCompletionResponse" if endpoint == "chat" else "CreateCompletionResponse"
    assert list(validator(name).iter_errors(body)) == []
    if endpoint == "chat":
        assert body["choices"][0]["message"]["refusal"] is None
        assert body["choices"][0]["logprobs"]["refusal"] is None


def test_stream_chunks_with_logprobs_validate():
    async def deltas():
        yield 0, GenerationDelta(0, "hi", (5,), (TOKENS[0],))
        yield 0, GenerationDelta(0, " there", (6,), (TOKENS[1],), finish_reason="length")

    async def lines():
        return [line async for line in sse_chunks(_prepared("chat"), deltas(), lambda: None)]

    chunks = [json.loads(line[6:]) for line in asyncio.run(lines())]
    for chunk in chunks:
        assert list(validator("CreateChatCompletionStreamResponse").iter_errors(chunk)) == []
    assert chunks[-1]["usage"]["total_tokens"] == 4


def test_fields_sdks_send_are_ignored(fake_conformance):
    url, _ = fake_conformance
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "hi", "name": "alice"}]
    plain = client.chat.completions.create(model="fake", messages=messages, max_tokens=4)
    decorated = client.chat.completions.create(
        model="fake",
        messages=messages,
        max_tokens=4,
        store=True,
        metadata={"team": "a"},
        service_tier="auto",
        user="user-1",
        parallel_tool_calls=False,
        modalities=["text"],
        prediction={"type": "content", "content": "hi"},
        reasoning_effort="low",
        verbosity="low",
        safety_identifier="s",
        prompt_cache_key="k",
    )
    assert decorated.choices[0].message.content == plain.choices[0].message.content
    assert decorated.choices[0].message.refusal is None


@pytest.mark.engine
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_generated_requests_conform_on_the_real_engine(real_server, endpoint):
    tally = run_cases(real_server.url, endpoint, cases=12, models=["smollm2"], budget="engine")
    print(f"{endpoint}: {tally.cases} cases, {tally.share_ok():.0%} 200, {tally.reasons}")  # -s
    _assert_clean(tally)
    assert tally.ok > 0, tally.reasons.most_common()


@pytest.mark.engine
def test_logprobs_and_lone_surrogates_on_the_real_engine(real_server):
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    r = httpx.post(f"{real_server.url}/v1/chat/completions", timeout=120,
                   json={**chat, "logprobs": True, "top_logprobs": 2})  # fmt: skip
    assert r.status_code == 200, r.text
    assert list(validator("CreateChatCompletionResponse").iter_errors(r.json())) == []
    raw = '{"model": "smollm2", "prompt": "a\\ud800", "max_tokens": 2}'
    r = httpx.post(f"{real_server.url}/v1/completions", content=raw, timeout=120,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    bad = {**chat, "messages": [{"role": "user", "content": "a\ud800"}]}
    r = httpx.post(f"{real_server.url}/v1/chat/completions", timeout=120,
                   content=json.dumps(bad),
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
