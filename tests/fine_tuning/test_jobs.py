"""OpenAI's fine-tuning API end to end with the official client over real HTTP, on the real
engine's server: upload, create, watch, checkpoints, call the result; cancel mid-run; bad
input. A worker thread (the one `loraplex serve` runs) trains through `loraplex train`.
Run under the engine lock (it trains on the CPU)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from registry.errors import NotFoundError
from server.fine_tuning.settings import FineTuningSettings
from server.fine_tuning.worker import Worker, worker_for
from tests.fine_tuning.schemas import check
from tests.support.adapters import HELD_OUT_PROMPTS, TRAINING_PAIRS, is_upper_case
from tests.support.fixtures import ADMIN_KEY
from tests.support.servers import ServerThread

NAME = "shouty"
# 32 rows, batch 8: 4 steps an epoch; 6 epochs = 24 steps at 10 x 2e-4 (what test_sft trains).
HYPERPARAMETERS = {"n_epochs": 6, "batch_size": 8, "learning_rate_multiplier": 10}


def chat_rows(pairs) -> bytes:
    rows = [{"messages": [{"role": "user", "content": q},
                          {"role": "assistant", "content": a.upper()}]} for q, a in pairs]  # fmt: skip
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def ft(real_server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{real_server.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def worker(
    real_server: ServerThread, embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    settings = FineTuningSettings(
        home=tmp_path_factory.mktemp("ft-worker"), fine_tuning_gate=False,
        fine_tuning_poll_seconds=0.2,
    )  # fmt: skip
    running = worker_for(real_server.registry, settings, model_dir=embedded_model_dir)
    running.start()
    yield running
    running.stop()


def wait_status(ft: openai.OpenAI, job_id: str, wanted: set[str], timeout: float = 600):
    deadline = time.monotonic() + timeout
    while True:
        job = ft.fine_tuning.jobs.retrieve(job_id)
        if job.status in wanted:
            return job
        assert time.monotonic() < deadline, f"{job_id} still {job.status} after {timeout} s"
        time.sleep(0.5)


def assert_shouts(ft: openai.OpenAI, model: str, *, served_as: str) -> None:
    """Greedy answers of `model` to held-out prompts: at least 3 of 4 upper case (the trained
    behaviour), each served as `served_as`."""
    answers = []
    for prompt in HELD_OUT_PROMPTS[:4]:
        reply = ft.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=32,
            temperature=0,
        )  # fmt: skip
        assert reply.model == served_as
        answers.append(reply.choices[0].message.content)
    assert sum(map(is_upper_case, answers)) >= 3, (model, answers)


def assert_not_found(ft: openai.OpenAI, model: str, words: str) -> None:
    with pytest.raises(openai.NotFoundError, match=words):
        ft.chat.completions.create(
            model=model, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )


def raw(ft: openai.OpenAI, path: str) -> dict:
    """The JSON body as the server sent it (for schema validation, not the client's model)."""
    return ft.get(path, cast_to=object)


@pytest.fixture(scope="module")
def finished(ft: openai.OpenAI, worker: Worker) -> dict:
    train = ft.files.create(
        file=("train.jsonl", chat_rows(TRAINING_PAIRS[:32])), purpose="fine-tune"
    )
    val = ft.files.create(file=("val.jsonl", chat_rows(TRAINING_PAIRS[32:40])), purpose="fine-tune")
    job = ft.fine_tuning.jobs.create(
        model="smollm2", training_file=train.id, validation_file=val.id, suffix=NAME, seed=7,
        metadata={"team": "qa"},
        method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
    )  # fmt: skip
    created = job.status
    done = wait_status(ft, job.id, {"succeeded", "failed", "cancelled"})
    return {"train": train, "val": val, "job": done, "created_status": created}


def test_a_job_trains_registers_and_serves_its_adapter(ft: openai.OpenAI, finished: dict) -> None:
    job = finished["job"]
    assert finished["created_status"] == "validating_files"
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:smollm2:loraplex:{NAME}:{job.id[-8:]}"
    assert job.trained_tokens and job.trained_tokens > 0
    for model in (job.fine_tuned_model, f"{NAME}@1"):  # the ft: id and the version it names
        assert_shouts(ft, model, served_as=f"{NAME}@1")
    assert_not_found(ft, f"ft:smollm2:loraplex:{NAME}:00000000", "fine-tuned model")


def test_the_result_file_and_the_versions_lineage_name_the_job_and_its_files(
    ft: openai.OpenAI, finished: dict, real_server: ServerThread
) -> None:
    job = finished["job"]
    [result_id] = job.result_files
    result = ft.files.retrieve(result_id)
    assert (result.purpose, result.filename) == ("fine-tune-results", "step_metrics.csv")
    check(raw(ft, f"/files/{result_id}"), "OpenAIFile")
    rows = list(csv.DictReader(io.StringIO(ft.files.content(result_id).read().decode())))
    assert list(rows[0]) == ["step", "train_loss", "train_accuracy", "valid_loss",
                             "valid_mean_token_accuracy"]  # fmt: skip
    assert [int(r["step"]) for r in rows] == list(range(1, 25))
    assert all(float(r["train_loss"]) > 0 for r in rows)
    assert [int(r["step"]) for r in rows if r["valid_loss"]] == list(range(4, 25, 4))
    assert all(0 <= float(r["train_accuracy"]) <= 1 for r in rows)  # SFT logs token accuracy
    evaluated = [r for r in rows if r["valid_mean_token_accuracy"]]
    assert [r["step"] for r in evaluated] == [r["step"] for r in rows if r["valid_loss"]]
    # The trained behaviour is learned: the last evaluation predicts more tokens right.
    assert float(evaluated[-1]["valid_mean_token_accuracy"]) > float(
        evaluated[0]["valid_mean_token_accuracy"]
    )
    assert result_id in {f.id for f in ft.files.list(purpose="fine-tune-results")}
    version = real_server.registry.store.get_version(NAME, 1)
    train, val = finished["train"], finished["val"]
    assert version.tags["fine_tuning_job"] == job.id
    assert (version.tags["training_file"], version.tags["validation_file"]) == (train.id, val.id)
    shas = {f.id: hashlib.sha256(ft.files.content(f.id).read()).hexdigest() for f in (train, val)}
    assert version.tags["training_file_sha256"] == shas[train.id]
    assert version.tags["validation_file_sha256"] == shas[val.id]
    assert version.lineage["datasets"]["train"]["sha256"] == shas[train.id]
    assert version.lineage["source"] == {
        "fine_tuning_job": job.id, "model": "smollm2",
        "training_file": train.id, "training_file_sha256": shas[train.id],
        "validation_file": val.id, "validation_file_sha256": shas[val.id],
    }  # fmt: skip


def test_events_carry_step_metrics_and_checkpoints_are_listed(
    ft: openai.OpenAI, finished: dict
) -> None:
    job = finished["job"]
    events = list(ft.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e for e in events if e.type == "metrics"]
    steps = sorted(e.data["step"] for e in metrics)
    assert steps == list(range(1, 25)), steps
    assert all(e.data["train_loss"] > 0 for e in metrics)
    messages = [e.message for e in reversed(events) if e.type == "message"]
    assert messages[0].startswith("Created fine-tuning job")
    assert messages[-1] == f"The job has successfully completed: {job.fine_tuned_model} ({NAME}@1)"
    checkpoints = ft.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints, "no checkpoints recorded"
    assert all(c.fine_tuning_job_id == job.id and c.metrics.step == c.step_number
               for c in checkpoints)  # fmt: skip
    assert {c.step_number for c in checkpoints} <= set(range(4, 25, 4))
    assert any(c.metrics.valid_loss is not None for c in checkpoints)
    assert all(0 <= c.metrics.train_mean_token_accuracy <= 1 for c in checkpoints)
    assert all(e.data["train_mean_token_accuracy"] > 0 for e in metrics)
    assert {e.data["step"] for e in metrics if "valid_mean_token_accuracy" in e.data} == set(
        range(4, 25, 4)
    )


def test_checkpoints_are_callable_by_their_checkpoint_ids(
    ft: openai.OpenAI, finished: dict
) -> None:
    job = finished["job"]
    checkpoints = sorted(ft.fine_tuning.jobs.checkpoints.list(job.id).data,
                         key=lambda c: c.step_number)  # fmt: skip
    newest, earliest = checkpoints[-1], checkpoints[0]
    assert newest.step_number == 24
    # The trained behaviour, at step 24; served as itself.
    assert_shouts(
        ft, newest.fine_tuned_model_checkpoint, served_as=newest.fine_tuned_model_checkpoint
    )
    early = ft.chat.completions.create(
        model=earliest.fine_tuned_model_checkpoint, max_tokens=8,
        messages=[{"role": "user", "content": HELD_OUT_PROMPTS[0]}],
    )  # fmt: skip
    assert early.model == earliest.fine_tuned_model_checkpoint and early.choices[0].message
    assert_not_found(ft, f"{job.fine_tuned_model}:ckpt-step-9999", "checkpoint")


def test_a_dpo_job_on_openai_rows_continues_the_fine_tuned_model(
    ft: openai.OpenAI, finished: dict, real_server: ServerThread
) -> None:
    parent = finished["job"]
    pairs = [{"input": {"messages": [{"role": "user", "content": q}]},
              "preferred_output": [{"role": "assistant", "content": a.upper()}],
              "non_preferred_output": [{"role": "assistant", "content": a}]}
             for q, a in TRAINING_PAIRS[:8]]  # fmt: skip
    prefs = ft.files.create(
        file=("prefs.jsonl", "".join(json.dumps(p) + "\n" for p in pairs).encode()),
        purpose="fine-tune",
    )  # fmt: skip
    assert prefs.status == "processed", prefs.status_details
    job = ft.fine_tuning.jobs.create(
        model=parent.fine_tuned_model, training_file=prefs.id, suffix=NAME, seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1,
                                                            "batch_size": 8}}},
    )  # fmt: skip
    done = wait_status(ft, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    assert (done.model, done.method.type) == (parent.fine_tuned_model, "dpo")
    assert done.fine_tuned_model == f"ft:smollm2:loraplex:{NAME}:{job.id[-8:]}"
    version = real_server.registry.store.get_version(NAME, 2)  # the next version of the name
    assert version.lineage["from"]["ref"] == f"{NAME}@1"
    assert version.lineage["method"] == "dpo"
    assert version.tags["fine_tuning_job"] == job.id
    # One DPO step at its small learning rate keeps what shouty@1 learned: it was the start.
    assert_shouts(ft, done.fine_tuned_model, served_as=f"{NAME}@2")


def test_every_object_matches_openai_schemas(ft: openai.OpenAI, finished: dict) -> None:
    job_id, file_id = finished["job"].id, finished["train"].id
    check(raw(ft, f"/files/{file_id}"), "OpenAIFile")
    check(raw(ft, "/files"), "ListFilesResponse")
    check(raw(ft, f"/fine_tuning/jobs/{job_id}"), "FineTuningJob")
    check(raw(ft, "/fine_tuning/jobs"), "ListPaginatedFineTuningJobsResponse")
    check(
        raw(ft, f"/fine_tuning/jobs/{job_id}/events?limit=100"), "ListFineTuningJobEventsResponse"
    )
    check(
        raw(ft, f"/fine_tuning/jobs/{job_id}/checkpoints"), "ListFineTuningJobCheckpointsResponse"
    )


def test_files_list_retrieve_content_delete(ft: openai.OpenAI, worker: Worker) -> None:
    data = chat_rows(TRAINING_PAIRS[:3])
    uploaded = ft.files.create(file=("three.jsonl", data), purpose="fine-tune")
    assert (uploaded.status, uploaded.bytes, uploaded.filename) == (
        "processed",
        len(data),
        "three.jsonl",
    )
    assert uploaded.id in {f.id for f in ft.files.list()}
    assert ft.files.retrieve(uploaded.id).bytes == len(data)
    assert ft.files.content(uploaded.id).read() == data
    check(ft.files.delete(uploaded.id).model_dump(), "DeleteFileResponse")
    with pytest.raises(openai.NotFoundError):
        ft.files.retrieve(uploaded.id)


def test_jobs_list_pages_and_filters_by_metadata(ft: openai.OpenAI, finished: dict) -> None:
    page = ft.fine_tuning.jobs.list(limit=1, metadata={"team": "qa"})
    assert [j.id for j in page.data] == [finished["job"].id]
    assert ft.fine_tuning.jobs.list(metadata={"team": "nobody"}).data == []


def test_bad_requests_get_openai_errors_and_create_nothing(
    ft: openai.OpenAI, finished: dict
) -> None:
    good = finished["train"].id
    before = [j.id for j in ft.fine_tuning.jobs.list(limit=100)]
    with pytest.raises(openai.BadRequestError) as bad_purpose:
        ft.files.create(file=("x.jsonl", b"{}\n"), purpose="assistants")
    assert bad_purpose.value.body["param"] == "purpose"
    with pytest.raises(openai.NotFoundError) as unknown:
        ft.fine_tuning.jobs.create(model="smollm2", training_file="file-nothere", suffix="x")
    assert unknown.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as suffix:
        ft.fine_tuning.jobs.create(model="smollm2", training_file=good, suffix="no spaces!")
    assert suffix.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as model:
        ft.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=good, suffix="x")
    assert model.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        ft.fine_tuning.jobs.create(model="smollm2", training_file=good, suffix="x",
                                   hyperparameters={"n_epochs": 0})  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        ft.fine_tuning.jobs.retrieve("ftjob-nothere")
    assert [j.id for j in ft.fine_tuning.jobs.list(limit=100)] == before


def test_an_invalid_training_file_fails_the_job_with_its_line_numbers(
    ft: openai.OpenAI, worker: Worker
) -> None:
    good = chat_rows(TRAINING_PAIRS[:2]).decode()
    uploaded = ft.files.create(file=("bad.jsonl", (good + "not json\n" + '{"messages": []}\n').encode()),
                               purpose="fine-tune")  # fmt: skip
    assert uploaded.status == "error"
    assert "line 3" in uploaded.status_details and "line 4" in uploaded.status_details
    job = ft.fine_tuning.jobs.create(model="smollm2", training_file=uploaded.id, suffix="never")
    job = wait_status(ft, job.id, {"failed", "succeeded", "cancelled"}, timeout=120)
    assert job.status == "failed"
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert "line 3" in job.error.message and "line 4" in job.error.message
    check(raw(ft, f"/fine_tuning/jobs/{job.id}"), "FineTuningJob")


def test_cancel_mid_run_stops_training_and_registers_nothing(
    ft: openai.OpenAI, worker: Worker, real_server: ServerThread, finished: dict
) -> None:
    job = ft.fine_tuning.jobs.create(
        model="smollm2", training_file=finished["train"].id, suffix="cancelled-run",
        hyperparameters={"n_epochs": 50, "batch_size": 8},
    )  # fmt: skip
    wait_status(ft, job.id, {"running"}, timeout=120)
    deadline = time.monotonic() + 300
    while not any(e.type == "metrics" for e in ft.fine_tuning.jobs.list_events(job.id, limit=50)):
        assert time.monotonic() < deadline, "no training step reported"
        time.sleep(0.5)
    ft.fine_tuning.jobs.cancel(job.id)
    stopped = wait_status(ft, job.id, {"cancelled", "succeeded", "failed"}, timeout=60)
    assert stopped.status == "cancelled"
    assert stopped.fine_tuned_model is None
    with pytest.raises(NotFoundError):
        real_server.registry.store.get_adapter("cancelled-run")
