"""Evaluations stored on a version: appended, listed oldest first, the latest found; refused for
unknown versions and unstorable metrics; rows never change; the revision servers poll stays;
`registry show` prints the latest one's summary and --json lists them all."""

from __future__ import annotations

import json

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from registry.cli import app
from registry.errors import ImmutableRecordError, VersionNotFoundError
from registry.evaluations import EvaluationRecord, InvalidEvaluationError, summary_line
from registry.tables import EvaluationRow

SHA = "ab" * 32


def document(exact: float, base_exact: float) -> dict:
    return {
        "metrics": {
            "version": {"loss": 0.5, "exact_match": exact, "rouge_l": 0.9},
            "baseline": {"loss": 2.25, "exact_match": base_exact, "rouge_l": 0.4},
        },
        "forgetting": {"forgetting": 0.05, "lost": ["What is 2 + 2?"]},
    }


@pytest.fixture
def two_versions(registry, make_adapter):
    registry.register("support", make_adapter(), actor="ana")
    registry.register("support", make_adapter(), actor="ana")
    return registry


def test_evaluations_are_appended_and_listed_oldest_first(two_versions):
    store = two_versions.store
    revision = store.revision()
    first = store.evaluations.add(
        "support", 2, baseline="base", dataset_sha256=SHA, metrics=document(0.5, 0.0), actor="ana"
    )
    second = store.evaluations.add(
        "support", 2, baseline="support@1", dataset_sha256=SHA, metrics=document(0.75, 0.5),
        actor="bo",
    )  # fmt: skip
    assert store.revision() == revision  # servers need not reload for an evaluation
    listed = store.evaluations.list("support", 2)
    assert [e.id for e in listed] == [first.id, second.id]
    assert [(e.baseline, e.created_by, e.ref) for e in listed] == [
        ("base", "ana", "support@2"),
        ("support@1", "bo", "support@2"),
    ]
    assert listed[1].metrics == document(0.75, 0.5)
    assert store.evaluations.latest("support", 2) == second
    assert store.evaluations.list("support", 1) == []
    assert store.evaluations.latest("support", 1) is None
    assert listed[0].to_json()["metrics"]["metrics"]["version"]["exact_match"] == 0.5


def test_unknown_versions_and_bad_documents_are_refused(two_versions):
    evaluations = two_versions.store.evaluations
    with pytest.raises(VersionNotFoundError, match="versions: 1, 2"):
        evaluations.add("support", 3, baseline="base", dataset_sha256=SHA, metrics={}, actor="a")
    with pytest.raises(VersionNotFoundError):
        evaluations.list("support", 9)
    with pytest.raises(InvalidEvaluationError) as refused:
        evaluations.add(
            "support", 1, baseline="", dataset_sha256="nope", metrics={"loss": float("nan")},
            actor="a",
        )  # fmt: skip
    message = str(refused.value)
    assert "baseline must be" in message and "dataset_sha256" in message and "finite" in message
    assert evaluations.list("support", 1) == []


def test_evaluation_rows_never_change(two_versions):
    store = two_versions.store
    store.evaluations.add(
        "support", 1, baseline="base", dataset_sha256=SHA, metrics={"a": 1}, actor="ana"
    )
    with Session(store.engine) as session:
        row = session.exec(select(EvaluationRow)).one()
        row.baseline = "other"
        session.add(row)
        with pytest.raises(ImmutableRecordError):
            session.commit()
    with Session(store.engine) as session:
        row = session.exec(select(EvaluationRow)).one()
        session.delete(row)
        with pytest.raises(ImmutableRecordError):
            session.commit()


def test_the_summary_line_reads_the_stored_document(two_versions):
    record = two_versions.store.evaluations.add(
        "support", 1, baseline="base", dataset_sha256=SHA, metrics=document(0.5, 0.25), actor="a"
    )
    assert summary_line(record) == (
        "vs base: loss 0.500 (base 2.250), exact_match 0.500 (base 0.250), "
        "rouge_l 0.900 (base 0.400), forgetting +0.050"
    )
    bare = EvaluationRecord(
        id=1, name="x", version=1, baseline="base", dataset_sha256=SHA,
        metrics={"metrics": "odd"}, created_at=record.created_at, created_by="a",
    )  # fmt: skip
    assert summary_line(bare) == "vs base: no metrics"


def test_registry_show_prints_the_latest_evaluation(two_versions, settings):
    two_versions.store.evaluations.add(
        "support", 2, baseline="base", dataset_sha256=SHA, metrics=document(0.5, 0.0), actor="a"
    )
    two_versions.store.evaluations.add(
        "support", 2, baseline="support@1", dataset_sha256=SHA, metrics=document(0.75, 0.5),
        actor="a",
    )  # fmt: skip
    stores = ["--registry", settings.database_url(), "--artifacts", settings.artifacts_url()]
    runner = CliRunner()
    shown = runner.invoke(app, ["show", "support@2", *stores])
    assert shown.exit_code == 0, shown.output
    assert "evaluation:     vs support@1: loss 0.500 (support@1 2.250), exact_match 0.750" in (
        shown.stdout
    )
    assert "(2 in all; latest " in shown.stdout
    data = json.loads(runner.invoke(app, ["show", "support@2", "--json", *stores]).stdout)
    assert [e["baseline"] for e in data["evaluations"]] == ["base", "support@1"]
    assert data["evaluations"][1]["metrics"] == document(0.75, 0.5)
    plain = runner.invoke(app, ["show", "support@1", *stores])
    assert "evaluation:" not in plain.stdout
    assert (
        json.loads(runner.invoke(app, ["show", "support@1", "--json", *stores]).stdout)[
            "evaluations"
        ]
        == []
    )
