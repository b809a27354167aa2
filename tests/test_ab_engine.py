"""End to end on the real engine: an experiment between two real adapters, started through the
admin API, simulated users calling `model=NAME` with the official client and rating the answers
(better for one adapter), ending in an automatic promotion, and in a second run an automatic
rollback, each visible in `registry history` with the statistics in the alias event."""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest
from typer.testing import CliRunner

from loraplex.cli import app as cli_app
from tests.support.adapters import HELD_OUT_PROMPTS
from tests.support.fixtures import ADMIN_KEY
from tests.support.servers import wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _run_experiment(real_server, client: openai.OpenAI, test_adapters, *, good: str) -> dict:
    registry = real_server.registry
    name = f"ab-{uuid.uuid4().hex[:8]}"
    registry.register(name, test_adapters["caps"], actor="test")  # v1: the control
    registry.register(name, test_adapters["prefix"], actor="test")  # v2: the candidate
    registry.store.promote(name, 1, actor="test", reason="first release")
    started = httpx.post(
        f"{real_server.url}/admin/experiments", headers=ADMIN,
        json={"name": name, "control": 1, "candidate": 2, "ramp": [50],
              "config": {"auto": True, "window_seconds": 0.5, "dwell_seconds": 0,
                         "final_dwell_seconds": 0, "min_users_per_arm": 10,
                         "guardrails": {"errors": 0.9}}},
    )  # fmt: skip
    assert started.status_code == 201, started.text
    experiment = started.json()["id"]
    good_model = f"{name}@{1 if good == 'control' else 2}"
    users = iter(range(10_000))

    def some_users_rate() -> bool:
        for _ in range(6):
            user = f"user-{next(users)}"
            raw = client.chat.completions.with_raw_response.create(
                model=name, user=user, max_tokens=2, temperature=0,
                messages=[{"role": "user", "content": HELD_OUT_PROMPTS[0]}],
            )  # fmt: skip
            reply = raw.parse()
            if raw.headers.get("x-loraplex-experiment") != str(experiment):
                continue  # the experiment ended meanwhile, or is not applied yet
            assert reply.model == f"{name}@{1 + int(raw.headers['x-loraplex-variant'])}"
            score = 1.0 if reply.model == good_model else 0.0
            rated = httpx.post(f"{real_server.url}/v1/feedback",
                               json={"completion_id": reply.id, "score": score})  # fmt: skip
            assert rated.status_code == 200, rated.text
        status = httpx.get(f"{real_server.url}/admin/experiments/{name}", headers=ADMIN).json()
        return status["experiment"]["status"] != "running"

    wait_for(some_users_rate, timeout=600)
    wait_for(lambda: client.chat.completions.create(
        model=name, user="after", max_tokens=1, messages=[{"role": "user", "content": "hi"}],
    ).model == good_model)  # fmt: skip
    result = CliRunner().invoke(
        cli_app, ["registry", "history", name, "--json", "--registry",
                  str(registry.store.engine.url)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"name": name, "experiment": experiment, "history": json.loads(result.output)}


@pytest.mark.engine
def test_better_feedback_for_the_candidate_ends_in_an_automatic_promotion(
    real_server, client, test_adapters
):
    run = _run_experiment(real_server, client, test_adapters, good="candidate")
    event = run["history"][-1]
    assert (event["kind"], event["from"], event["to"]) == ("promote", 1, 2)
    assert event["actor"] == "loraplex-ab"
    assert event["details"]["experiment"] == run["experiment"]
    assert event["details"]["decision"] == "promote"
    primary = event["details"]["statistics"]["comparisons"]["1"]["primary"]
    assert primary["lower"] > 0 and primary["candidate_mean"] > primary["control_mean"]


@pytest.mark.engine
def test_worse_feedback_for_the_candidate_ends_in_an_automatic_rollback(
    real_server, client, test_adapters
):
    run = _run_experiment(real_server, client, test_adapters, good="control")
    event = run["history"][-1]
    assert event["details"]["decision"] == "rollback"
    assert event["to"] == 1  # production stays on (returns to) the control
    primary = event["details"]["statistics"]["comparisons"]["1"]["primary"]
    assert primary["upper"] < 0
