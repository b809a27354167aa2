"""End to end on the real engine and embedded model, through the official `openai` client over
real HTTP: base answers, adapter behaviour, isolation in mixed batches, streaming, structured
output, logprobs, and adapters the engine refuses."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from server.engine import AdapterHandle
from server.errors import AdapterLoadError
from tests.support.adapters import (
    ADAPTER_SPECS,
    HELD_OUT_PROMPTS,
    behaviours,
    mixed_batch_answers,
    wrong_behaviours,
)

pytestmark = pytest.mark.engine
BASE = "smollm2"


def ask(client: openai.OpenAI, model: str, prompt: str, **kwargs) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=kwargs.pop("max_tokens", 64),
        **kwargs,
    )
    return reply.choices[0].message.content


# A question the model answers with a clear margin. Asked plainly ("What is the capital of
# France?"), its first token is a near tie in bf16 ("The" -1.90 against "L" -2.03, eager), which
# the compiled model's rounding turns into "L'Étoile, …": a coin toss, not a test.
PARIS_PROMPT = "Complete the sentence: The capital of France is"


def test_base_model_answers_coherently(client):
    answer = ask(client, BASE, PARIS_PROMPT)
    assert "Paris" in answer
    assert behaviours(answer) == set()


@pytest.mark.parametrize("name", sorted(ADAPTER_SPECS))
def test_each_adapter_shows_its_behaviour(client, name):
    raw = client.chat.completions.with_raw_response.create(
        model=name,
        messages=[{"role": "user", "content": HELD_OUT_PROMPTS[0]}],
        temperature=0,
        max_tokens=64,
    )
    reply = raw.parse()
    assert raw.headers["x-loraplex-adapter"] == name
    assert reply.model == name
    assert behaviours(reply.choices[0].message.content) == {name}


def test_mixed_batch_isolation(async_client):
    """Base plus three adapters at once, greedy: each answer shows its own behaviour only.
    With vLLM's own CPU LoRA ops, base rows batched with adapter rows pick up an adapter
    (tests/test_cli.py::test_loraplex_serve_with_vllm_lora_ops shows it)."""
    base_leaks, misses = wrong_behaviours(mixed_batch_answers(async_client, BASE), BASE)
    # Adapters show their behaviour on most held-out prompts (5+/6 when trained); the base
    # model must never show an adapter's behaviour.
    assert not base_leaks, base_leaks
    assert len(misses) <= 2, misses


def test_the_model_runs_compiled_with_lora(real_server):
    """vLLM's CPU platform runs the model eagerly whenever LoRA is on; loraplex's LoRA calls
    inside the forward are torch ops of their own (server/vllm_patches.py, patch 3), so the
    model runs compiled, and every test of this file (isolation above, adapters' behaviours)
    runs on that compiled model."""
    from vllm.config import CompilationMode

    engine = real_server.app.state.loraplex.engine
    mode = engine._llm.vllm_config.compilation_config.mode
    assert mode == CompilationMode.DYNAMO_TRACE_ONCE


def test_streaming_matches_the_whole_answer(client):
    prompt = "Name a primary color."
    whole = ask(client, "prefix", prompt, max_tokens=32)
    stream = client.chat.completions.create(
        model="prefix",
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert behaviours(text) == {"prefix"}
    assert text.split()[:3] == whole.split()[:3]
    assert 0 < chunks[-1].usage.completion_tokens <= 32
    assert chunks[-1].model == "prefix"


def test_text_completions_with_logprobs(client):
    result = client.completions.create(
        model=BASE, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    )
    choice = result.choices[0]
    assert "Paris" in choice.text
    assert len(choice.logprobs.tokens) == result.usage.completion_tokens == 4
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)


def test_chat_logprobs_n_and_seed(client):
    kwargs = dict(
        model=BASE,
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=8,
        temperature=1.0,
        seed=7,
        n=2,
        logprobs=True,
        top_logprobs=3,
    )
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert len(first.choices) == 2
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    token = first.choices[0].logprobs.content[0]
    assert len(token.top_logprobs) == 3 and token.logprob <= 0


def test_json_schema_response_format(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    text = ask(
        client,
        BASE,
        "Describe a person as JSON with a name and an age.",
        max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    )
    data = json.loads(text)
    assert isinstance(data["name"], str) and isinstance(data["age"], int)


def test_stop_strings_and_length_finish(client):
    reply = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        temperature=0,
        max_tokens=60,
        stop=["5"],
    )
    assert "5" not in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "Tell a story."}], max_tokens=3
    )
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list()]
    assert ids[:4] == [BASE, *sorted(ADAPTER_SPECS)]  # then registry names, if any


def test_a_refused_adapter_never_harms_the_engine(real_server, client, tmp_path):
    """vLLM dies if a bad adapter reaches generate(); add_lora must refuse it cleanly instead."""
    bad = tmp_path / "garbage"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    engine = real_server.app.state.loraplex.engine
    with pytest.raises(AdapterLoadError, match="garbage"):
        real_server.call(engine.add_adapter(AdapterHandle("garbage", 900, str(bad))))
    assert "Paris" in ask(client, BASE, PARIS_PROMPT)
    assert httpx.get(f"{real_server.url}/ready").status_code == 200


def test_client_disconnect_mid_stream_aborts_cleanly(real_server, client):
    body = {
        "model": "caps",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 400,
        "stream": True,
    }
    with httpx.stream("POST", f"{real_server.url}/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk
    assert behaviours(ask(client, "caps", HELD_OUT_PROMPTS[1])) == {"caps"}
    metrics = httpx.get(f"{real_server.url}/metrics").text
    assert 'status="499"' in metrics


def test_metrics_label_by_adapter(real_server, client):
    ask(client, "suffix", HELD_OUT_PROMPTS[2], max_tokens=8)
    text = httpx.get(f"{real_server.url}/metrics").text
    assert 'loraplex_requests_total{endpoint="chat",model="suffix",status="200"}' in text
    assert 'loraplex_adapter_loads_total{adapter="suffix",status="ok"} 1.0' in text
    assert "loraplex_engine_ready 1.0" in text
