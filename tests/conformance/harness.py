"""Conformance to OpenAI's published API description (`openai-subset.json` beside this file).

Requests are generated from OpenAI's own request schemas (hypothesis-jsonschema, offline) and
sent over real HTTP; every answer is checked: a 200 body (and every SSE chunk) must validate
against OpenAI's response schema, any other answer must be a 4xx in OpenAI's error shape, and
nothing may be a 5xx. `run_cases` returns the tally that `report.py` prints.

Two things of each generated request are fitted, and only these: `model` is one this server
serves (the spec allows any string), and token budgets are kept small so the run stays fast
(`max_tokens` above 16 becomes 1..16; on the real engine `n` and the budget are smaller still).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from jsonschema import Draft202012Validator

SPEC_PATH = Path(__file__).with_name("openai-subset.json")
ENDPOINTS = {
    "chat": ("/v1/chat/completions", "CreateChatCompletionRequest"),
    "completions": ("/v1/completions", "CreateCompletionRequest"),
}
RESPONSES = {
    ("chat", False): "CreateChatCompletionResponse",
    ("chat", True): "CreateChatCompletionStreamResponse",
    ("completions", False): "CreateCompletionResponse",
    ("completions", True): "CreateCompletionResponse",  # OpenAI streams the same object
}
_DROPPED = {"discriminator", "deprecated", "format", "x-stainless-const", "x-oaiTypeLabel"}


def _to_json_schema(node):
    """OpenAPI 3.1 as OpenAI writes it (3.0's `nullable`, component refs) to JSON Schema."""
    if isinstance(node, list):
        return [_to_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _DROPPED or key.startswith("x-") or key == "nullable":
            continue
        if key == "$ref":
            out[key] = "#/$defs/" + value.rsplit("/", 1)[-1]
        elif key in ("properties", "$defs"):
            out[key] = {name: _to_json_schema(v) for name, v in value.items()}
        else:
            out[key] = _to_json_schema(value)
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def _defs() -> dict:
    spec = json.loads(SPEC_PATH.read_text())
    return {name: _to_json_schema(s) for name, s in spec["components"]["schemas"].items()}


def schema(name: str) -> dict:
    return {"$defs": _defs(), "$ref": f"#/$defs/{name}"}


@cache
def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(schema(name))


def source() -> dict:
    return json.loads(SPEC_PATH.read_text())["x-loraplex-source"]


# -- checking one answer ------------------------------------------------------------------------


@dataclass
class Tally:
    cases: int = 0
    ok: int = 0
    server_errors: int = 0
    reasons: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def share_ok(self) -> float:
        return self.ok / self.cases if self.cases else 0.0


def _schema_problems(name: str, body) -> list[str]:
    return [f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in validator(name).iter_errors(body)]  # fmt: skip


def _error_problems(status: int, body) -> list[str]:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return [f"{status}: not OpenAI's error shape: {str(body)[:200]}"]
    if not isinstance(error["message"], str) or not error["message"]:
        return [f"{status}: empty error message"]
    return []


def _reason(status: int, body) -> str:
    """A refusal's reason with the request's own values taken out, for counting."""
    error = body.get("error", {}) if isinstance(body, dict) else {}
    message = str(error.get("message", body))
    message = re.sub(r"Invalid request \(\d+ problems?\): ", "", message)
    message = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|-?\d+(\.\d+)?(e-?\d+)?", "#", message)
    return f"{status} {message[:110]}"


def _sse_events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def check(client: httpx.Client, endpoint: str, body: dict, tally: Tally) -> None:
    """Send one request and record what came back."""
    path = ENDPOINTS[endpoint][0]
    stream = body.get("stream") is True
    tally.cases += 1
    with client.stream("POST", path, json=body) as response:
        if response.status_code == 200 and stream:
            problems = _stream_problems(endpoint, _sse_events(response))
            answer = None
        else:
            response.read()
            answer = response.json() if response.content else None
            problems = []
    status = response.status_code
    if status == 200:
        tally.ok += 1
        if not stream:
            problems = _schema_problems(RESPONSES[(endpoint, False)], answer)
    else:
        if status >= 500:
            tally.server_errors += 1
            problems.append(f"{status} server error")
        elif not 400 <= status < 500:
            problems.append(f"unexpected status {status}")
        problems += _error_problems(status, answer)
        tally.reasons[f"{endpoint}: {_reason(status, answer)}"] += 1
    tally.violations += [f"{endpoint} {json.dumps(body)[:300]} -> {p}" for p in problems]


def _stream_problems(endpoint: str, events: list[str]) -> list[str]:
    if not events or events[-1] != "[DONE]":
        return ["stream does not end with [DONE]"]
    problems = []
    for event in events[:-1]:
        chunk = json.loads(event)
        if "error" in chunk:
            problems.append(f"error event in stream: {event[:200]}")
        else:
            problems += _schema_problems(RESPONSES[(endpoint, True)], chunk)
    return problems


def check_models(client: httpx.Client, tally: Tally) -> None:
    response = client.get("/v1/models")
    tally.cases += 1
    if response.status_code == 200:
        tally.ok += 1
    tally.violations += _schema_problems("ListModelsResponse", response.json())


# -- generating requests ------------------------------------------------------------------------

SMALL = {"fake": 16, "engine": 4}


def _fit(body: dict, model: str, budget: str) -> dict:
    """Only `model` and the token budget are changed; every other field is as generated."""
    body = {**body, "model": model}
    top = SMALL[budget]
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and value > top:
            body[key] = value % top + 1
    if budget == "engine":
        if isinstance(body.get("n"), int):
            body["n"] = body["n"] % 2 + 1
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = top
    return body


def requests(endpoint: str, models: list[str], budget: str) -> st.SearchStrategy[dict]:
    generated = from_schema(schema(ENDPOINTS[endpoint][1]))
    return st.builds(lambda b, m: _fit(b, m, budget), generated, st.sampled_from(models))


def run_cases(
    base_url: str, endpoint: str, *, cases: int, models: list[str], budget: str = "fake"
) -> Tally:
    """Generate `cases` requests for `endpoint`, send each, and tally the answers."""
    tally = Tally()
    timeout = 30 if budget == "fake" else 300
    with httpx.Client(base_url=base_url, timeout=timeout) as client:

        @settings(
            max_examples=cases,
            database=None,
            derandomize=True,  # the same cases every run: the figures compare across runs
            deadline=None,
            phases=[Phase.generate],  # every case is recorded; no shrinking
            suppress_health_check=list(HealthCheck),
        )
        @given(requests(endpoint, models, budget))
        def one(body: dict) -> None:
            check(client, endpoint, body, tally)

        one()
    return tally
