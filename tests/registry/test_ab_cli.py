"""`loraplex ab` as a user runs it, on a real registry database (SQLite and PostgreSQL): start
(every problem of a bad plan at once, nothing written), status with --json and --plot, stop
with --promote / --rollback (an alias event with the experiment's details), list."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from registry.experiment_records import CompletionDelta, CounterDelta, UserDelta
from server.ab.analysis import analyse


@pytest.fixture
def ab(settings, registry, make_adapter):
    for _ in range(3):
        registry.register("support", make_adapter(), actor="t")
    registry.store.promote("support", 1, actor="t")
    flags = ["--registry", settings.database_url(), "--artifacts", settings.artifacts_url()]

    def run(*args: str):
        return CliRunner().invoke(app, [*args, *flags])

    return run


def test_start_status_stop_promote(ab, registry, tmp_path):
    before = registry.store.revision()
    started = ab("ab", "start", "support", "--control", "1", "--candidate", "2", "--json")
    assert started.exit_code == 0, started.output
    exp = json.loads(started.output)
    assert exp["ramp"] == [1, 5, 10, 25, 50] and exp["config"]["auto"] is False
    assert registry.store.revision() > before  # servers pick it up on their next poll

    text = ab("ab", "start", "support", "--control", "1", "--candidate", "3")
    assert text.exit_code == 2 and "ab stop support" in text.output  # one at a time

    _some_traffic(registry, exp["id"])
    analyse(registry.store.experiments, exp["id"], now=datetime.now(UTC) + timedelta(hours=2))
    status = ab("ab", "status", "support", "--json", "--plot", str(tmp_path / "s.png"))
    assert status.exit_code == 0, status.output
    data = json.loads(status.output)
    assert [v["model"] for v in data["variants"]] == ["support@1", "support@2"]
    assert sum(v["users"] for v in data["variants"]) == 40
    assert data["recommendation"]["action"] in ("hold", "continue", "advance")
    assert (tmp_path / "s.png").stat().st_size > 10_000
    human = ab("ab", "status", "support")
    assert "decision" in human.output and "support@2" in human.output

    stopped = ab("ab", "stop", "support", "--promote", "2", "--reason", "looks good")
    assert stopped.exit_code == 0, stopped.output
    assert "support@production: 1 -> 2" in stopped.output
    assert registry.store.resolve("support").number == 2
    history = json.loads(ab("registry", "history", "support", "--json").output)
    assert history[-1]["details"]["experiment"] == exp["id"]
    assert "looks good" in history[-1]["reason"]
    again = ab("ab", "stop", "support", "--rollback")
    assert again.exit_code == 2 and "no running experiment" in again.output
    listed = json.loads(ab("ab", "list", "support", "--json").output)
    assert [e["status"] for e in listed] == ["promoted"]


def test_rollback_returns_production_to_the_control(ab, registry):
    registry.store.promote("support", 2, actor="t")
    assert ab("ab", "start", "support", "--variant", "1=50", "--variant", "3=50").exit_code == 0
    stopped = ab("ab", "stop", "support", "--rollback")
    assert stopped.exit_code == 0, stopped.output
    assert registry.store.resolve("support").number == 1


def test_a_bad_plan_reports_every_problem_and_writes_nothing(ab, registry):
    bad = ab("ab", "start", "support", "--control", "1", "--ramp", "5,1,80",
             "--guardrail", "tokens", "--alpha", "0.9")  # fmt: skip
    assert bad.exit_code == 2
    for problem in ("--ramp", "unknown guardrail", "--candidate", "alpha"):
        assert problem in bad.output, bad.output
    missing = ab("ab", "start", "support", "--control", "1", "--candidate", "9")
    assert missing.exit_code == 2 and "9" in missing.output
    assert registry.store.experiments.list() == []


def _some_traffic(registry, experiment_id: int) -> None:
    now = datetime.now(UTC)
    users = [UserDelta(experiment_id, f"{i:032x}", i % 2, now, requests=2) for i in range(40)]
    counters = [CounterDelta(experiment_id, v, requests=40) for v in (0, 1)]
    done = [
        CompletionDelta(f"c{i}", experiment_id, i % 2, f"{i:032x}", True, now) for i in range(40)
    ]
    registry.store.experiments.record(users=users, counters=counters, completions=done)
