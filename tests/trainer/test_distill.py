"""Distillation from a teacher over real HTTP: a loraplex server on the fake engine, and tiny
teacher apps that misbehave on purpose (slow, failing, rate-limited, answering garbage)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import typer
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from typer.testing import CliRunner

from server.engine_fake import ANSWER, FakeEngine
from tests.support.servers import ServerThread, free_port, wait_for
from trainer.distill import (
    DistillInputError,
    DistillSettings,
    distill,
    load_prompts,
    messages_key,
    read_answered,
    run_distill,
)
from trainer.distill_cli import distill as distill_command

ROOT = Path(__file__).resolve().parents[2]
Handler = Callable[[Request], Awaitable[Response]]


@pytest.fixture
def teacher() -> Iterator[Callable[[Handler], ServerThread]]:
    """Factory: a teacher whose /v1/chat/completions is `handler`; stopped afterwards."""
    started: list[ServerThread] = []

    def make(handler: Handler) -> ServerThread:
        app = FastAPI()
        app.add_api_route("/v1/chat/completions", handler, methods=["POST"])
        server = ServerThread(app).start(timeout=30)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def chat_answer(content: str | None, *, finish_reason: str = "stop") -> JSONResponse:
    message = {"role": "assistant"} | ({"content": content} if content is not None else {})
    choice = {"index": 0, "message": message, "finish_reason": finish_reason}
    return JSONResponse({"id": "x", "object": "chat.completion", "choices": [choice]})


async def last_user_message(request: Request) -> str:
    return (await request.json())["messages"][-1]["content"]


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def settings_for(url: str, tmp_path: Path, questions: list[str], **overrides) -> DistillSettings:
    if "prompts" not in overrides:
        overrides["prompts"] = write_prompts(tmp_path / "prompts.jsonl", questions)
    fields = dict(
        teacher_url=url, teacher_model="fake", out=tmp_path / "out.jsonl", max_tokens=64,
        backoff=0.01,
    )  # fmt: skip
    return DistillSettings(**(fields | overrides))


def examples(out: Path) -> list[dict]:
    text = out.read_text()
    assert text == "" or text.endswith("\n"), "torn last line"
    return [json.loads(line) for line in text.splitlines()]


def asked_prompts(out: Path) -> Counter[str]:
    return Counter(e["messages"][-2]["content"] for e in examples(out))


# --- resuming and deduplicating against a loraplex server --------------------------------------


def test_resumes_after_cancellation_and_answers_every_prompt_once(fake_server, tmp_path) -> None:
    server = fake_server(engine=FakeEngine(token_delay=0.01))
    prompts = [f"question {i}" for i in range(16)]
    settings = settings_for(server.url, tmp_path, prompts, concurrency=2)

    async def interrupted() -> None:
        main = asyncio.current_task()

        def stop_after_five(progress) -> None:
            if progress.written >= 5:
                main.cancel()

        await distill(settings, progress=stop_after_five)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(interrupted())
    first = asked_prompts(settings.out)
    assert 5 <= sum(first.values()) < len(prompts)
    meta = json.loads(settings.meta_path.read_text())
    assert meta["runs"][-1]["status"] == "interrupted"

    report = run_distill(settings)
    assert report.resumed == sum(first.values())
    assert report.asked == len(prompts) - report.resumed == report.written
    assert asked_prompts(settings.out) == Counter(prompts)
    assert [r["status"] for r in json.loads(settings.meta_path.read_text())["runs"]] == [
        "interrupted",
        "finished",
    ]
    assert run_distill(settings).asked == 0  # a third run has nothing left to ask


CLI_MAIN = (
    "import typer; from trainer.distill_cli import distill; "
    "app = typer.Typer(); app.command()(distill); app()"
)


def test_resumes_after_the_process_is_killed_mid_write(fake_server, tmp_path) -> None:
    server = fake_server(engine=FakeEngine(token_delay=0.02))
    prompts = [f"question {i}" for i in range(40)]
    settings = settings_for(server.url, tmp_path, prompts, concurrency=1)
    args = ["--teacher-url", server.url, "--teacher-model", "fake", "--max-tokens", "64"]
    args += ["--prompts", str(settings.prompts), "--out", str(settings.out)]
    process = subprocess.Popen([sys.executable, "-c", CLI_MAIN, *args], cwd=ROOT)
    try:
        wait_for(lambda: settings.out.exists() and settings.out.read_text().count("\n") >= 3)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    complete = len(examples(settings.out))
    assert complete < len(prompts)
    with settings.out.open("a") as f:  # what a kill in the middle of a write leaves
        f.write('{"messages": [{"role": "user", "content": "question 3')

    report = run_distill(dataclasses.replace(settings, concurrency=8))
    assert report.resumed == complete
    assert asked_prompts(settings.out) == Counter(prompts)


def test_identical_prompts_are_asked_once_and_identical_answers_kept(fake_server, tmp_path) -> None:
    engine = FakeEngine()
    server = fake_server(engine=engine)
    prompts = ["alpha", "beta", "alpha", "gamma", "beta", "alpha"]
    settings = settings_for(server.url, tmp_path, prompts)
    report = run_distill(settings)
    assert (report.prompts, report.unique, report.duplicates) == (6, 3, 3)
    assert len(engine.requests) == 3
    written = examples(settings.out)
    # The fake engine answers every prompt alike: different prompts stay different examples.
    assert {e["messages"][-1]["content"] for e in written} == {ANSWER}
    assert asked_prompts(settings.out) == Counter({"alpha": 1, "beta": 1, "gamma": 1})
    assert [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": ANSWER}] in [
        e["messages"] for e in written
    ]


def test_system_prompt_added_where_none_and_url_with_v1(fake_server, tmp_path) -> None:
    engine = FakeEngine()
    server = fake_server(engine=engine)
    chat = [{"role": "system", "content": "own"}, {"role": "user", "content": "hello"}]
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"messages": chat}) + "\n")
    settings = settings_for(f"{server.url}/v1/", tmp_path, [], prompts=prompts, system="Be brief.")
    assert run_distill(settings).written == 2
    by_prompt = {e["messages"][-2]["content"]: e["messages"] for e in examples(settings.out)}
    assert by_prompt["hi"][0] == {"role": "system", "content": "Be brief."}
    assert by_prompt["hello"][0] == {"role": "system", "content": "own"}


# --- the teacher's faults ---------------------------------------------------------------------


def test_concurrency_is_bounded_and_used(teacher, tmp_path) -> None:
    in_flight = 0
    most = 0

    async def counting(request: Request) -> Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.1)
        in_flight -= 1
        return chat_answer(f"answer to {await last_user_message(request)}")

    server = teacher(counting)
    settings = settings_for(server.url, tmp_path, [f"q{i}" for i in range(15)], concurrency=3)
    assert run_distill(settings).written == 15
    assert most == 3


def test_retries_500_and_429_with_retry_after_then_succeeds(teacher, tmp_path) -> None:
    attempts: dict[str, list[float]] = {}

    async def flaky(request: Request) -> Response:
        times = attempts.setdefault(await last_user_message(request), [])
        times.append(time.monotonic())
        if len(times) == 1:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if len(times) == 2:
            return JSONResponse({}, status_code=429, headers={"Retry-After": "0.4"})
        return chat_answer("finally")

    server = teacher(flaky)
    settings = settings_for(server.url, tmp_path, ["a", "b"], retries=3)
    report = run_distill(settings)
    assert (report.written, report.failed) == (2, {})
    for times in attempts.values():
        assert len(times) == 3
        assert times[2] - times[1] >= 0.35  # Retry-After, not the 10 ms backoff
    assert not settings.failures_path.exists()


def test_persistent_5xx_fails_after_retries_and_4xx_is_not_retried(teacher, tmp_path) -> None:
    attempts: Counter[str] = Counter()

    async def broken(request: Request) -> Response:
        prompt = await last_user_message(request)
        attempts[prompt] += 1
        status = 503 if prompt == "overloaded" else 400
        return JSONResponse({"error": {"message": f"no {prompt}"}}, status_code=status)

    server = teacher(broken)
    settings = settings_for(server.url, tmp_path, ["overloaded", "invalid"], retries=2)
    report = run_distill(settings)
    assert report.failed == {"http_503": 1, "http_400": 1}
    assert attempts == Counter({"overloaded": 3, "invalid": 1})
    failures = [json.loads(line) for line in settings.failures_path.read_text().splitlines()]
    assert {(f["reason"], f["detail"]) for f in failures} == {
        ("http_503", "no overloaded"),
        ("http_400", "no invalid"),
    }
    assert report.exit_code == 1


def test_a_teacher_that_times_out(teacher, tmp_path) -> None:
    attempts = 0

    async def slow(request: Request) -> Response:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(3)
        return chat_answer("too late")

    server = teacher(slow)
    settings = settings_for(server.url, tmp_path, ["wait"], timeout=0.2, retries=1)
    started = time.monotonic()
    report = run_distill(settings)
    assert time.monotonic() - started < 2.5  # two tries of 0.2 s, not of 3 s
    assert report.failed == {"timeout": 1}
    assert attempts == 2
    assert examples(settings.out) == []
    failure = json.loads(settings.failures_path.read_text())
    assert (failure["line"], failure["reason"]) == (1, "timeout")


def test_an_unreachable_teacher_fails_with_connection(tmp_path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    report = run_distill(settings_for(url, tmp_path, ["anyone?"], retries=1))
    assert report.failed == {"connection": 1}


def test_garbage_answers_are_counted_and_not_written(teacher, tmp_path) -> None:
    attempts: Counter[str] = Counter()

    async def garbage(request: Request) -> Response:
        prompt = await last_user_message(request)
        attempts[prompt] += 1
        return {
            "not json": lambda: PlainTextResponse("<html>502 Bad Gateway</html>"),
            "empty": lambda: chat_answer("  \n"),
            "no choices": lambda: JSONResponse({"choices": []}),
            "no content": lambda: chat_answer(None),
            "a list": lambda: JSONResponse([1, 2]),
            "fine": lambda: chat_answer("a real answer"),
        }[prompt]()

    server = teacher(garbage)
    prompts = ["not json", "empty", "no choices", "no content", "a list", "fine"]
    settings = settings_for(server.url, tmp_path, prompts, retries=2)
    report = run_distill(settings)
    assert report.failed == {
        "invalid_json": 1,
        "empty_content": 1,
        "no_choices": 2,
        "no_content": 1,
    }
    assert attempts == Counter(prompts)  # a garbage answer is not retried
    assert [e["messages"][-1]["content"] for e in examples(settings.out)] == ["a real answer"]
    failed = [json.loads(line)["messages"][0]["content"] for line in settings.failures_path.open()]
    assert sorted(failed) == sorted(prompts[:-1])


# --- filters ----------------------------------------------------------------------------------


def test_truncated_answers_dropped_unless_kept(fake_server, tmp_path) -> None:
    server = fake_server()
    settings = settings_for(server.url, tmp_path, ["one", "two"], max_tokens=3)
    report = run_distill(settings)
    assert (report.written, report.filtered, report.exit_code) == (0, {"truncated": 2}, 0)
    kept = run_distill(settings_for(server.url, tmp_path, ["one", "two"], max_tokens=3,
                                    keep_truncated=True))  # fmt: skip
    assert kept.written == 2
    assert {e["messages"][-1]["content"] for e in examples(settings.out)} == {"the quick brown"}


ANSWERS = {
    "short": "ok",
    "long": "x" * 500,
    "sorry": "I'm sorry, but I cannot help with that.",
    "banned": "This mentions a FORBIDDEN topic.",
    "good": "A perfectly fine answer.",
}


async def canned(request: Request) -> Response:
    return chat_answer(ANSWERS[await last_user_message(request)])


def test_length_and_refusal_filters(teacher, tmp_path) -> None:
    server = teacher(canned)
    settings = settings_for(
        server.url, tmp_path, list(ANSWERS), min_chars=5, max_chars=100,
        refusal_patterns=("forbidden",), drop_refusals=True,
    )  # fmt: skip
    report = run_distill(settings)
    assert report.filtered == {"too_short": 1, "too_long": 1, "refusal": 2}
    assert (report.written, report.exit_code) == (1, 0)
    assert asked_prompts(settings.out) == Counter({"good": 1})


def test_default_refusal_list_is_opt_in(teacher, tmp_path) -> None:
    server = teacher(canned)
    report = run_distill(settings_for(server.url, tmp_path, ["sorry", "banned", "good"]))
    assert (report.written, report.filtered) == (3, {})


def test_filtered_prompts_are_asked_again_on_a_rerun(teacher, tmp_path) -> None:
    server = teacher(canned)
    settings = settings_for(server.url, tmp_path, ["short", "good"], min_chars=5)
    assert run_distill(settings).filtered == {"too_short": 1}
    again = run_distill(settings)
    assert (again.resumed, again.asked, again.filtered) == (1, 1, {"too_short": 1})


# --- the sidecar and the API key --------------------------------------------------------------


def test_sidecar_records_lineage_and_never_the_key(fake_server, tmp_path) -> None:
    secret = "sk-distill-secret-0123456789"
    server = fake_server(api_keys=[secret])
    url = f"{server.url}/v1?token=query-secret"
    prompts = ["p1", "p2", "p1"]
    settings = settings_for(url, tmp_path, prompts, api_key=secret, api_key_env="TEACHER_KEY")
    assert secret not in repr(settings)
    first = run_distill(settings)
    second = run_distill(settings)
    assert (first.written, second.resumed, second.asked) == (2, 2, 0)

    meta = json.loads(settings.meta_path.read_text())
    run = meta["runs"][0]
    assert run["teacher"] == {"url": server.url, "model": "fake"}
    assert meta["teachers"] == [{"url": server.url, "model": "fake"}]
    assert run["prompts"]["sha256"] == hashlib.sha256(settings.prompts.read_bytes()).hexdigest()
    assert run["settings"]["api_key_env"] == "TEACHER_KEY"
    assert run["settings"]["temperature"] == 0.7 and run["settings"]["max_tokens"] == 64
    assert run["counts"] == first.counts()
    assert run["counts"]["duplicates"] == 1
    assert run["loraplex_version"] and run["started_at"] <= run["finished_at"]
    assert len(meta["runs"]) == 2 and meta["runs"][1]["counts"]["resumed"] == 2
    for path in tmp_path.iterdir():
        text = path.read_text()
        assert secret not in text and "query-secret" not in text, path


def test_a_rejected_key_is_not_retried_nor_echoed(teacher, tmp_path) -> None:
    async def echo_key(request: Request) -> Response:
        shown = request.headers["authorization"]
        return JSONResponse({"error": {"message": f"bad key {shown}"}}, status_code=401)

    server = teacher(echo_key)
    secret = "sk-wrong-key-9876"
    report = run_distill(settings_for(server.url, tmp_path, ["x"], api_key=secret))
    assert report.failed == {"http_401": 1}
    failure = json.loads((tmp_path / "out.jsonl.failed.jsonl").read_text())
    assert failure["detail"] == "bad key Bearer ***"


# --- input problems ---------------------------------------------------------------------------


def test_prompt_formats(tmp_path) -> None:
    text = tmp_path / "p.txt"
    text.write_text("first question\n\n  second question  \n")
    assert [p.messages for p in load_prompts(text)] == [
        ({"role": "user", "content": "first question"},),
        ({"role": "user", "content": "second question"},),
    ]
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    chat += [{"role": "user", "content": "c"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"messages": chat, "id": 7}) + "\n")
    (prompt,) = load_prompts(jsonl, system="S")
    assert prompt.line == 1 and prompt.messages == ({"role": "system", "content": "S"}, *chat)


def test_every_problem_of_the_prompts_file_with_its_line(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    lines = [
        '{"prompt": "fine"}',
        "not json",
        '{"prompt": ""}',
        '{"prompt": "a", "messages": []}',
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
        '{"messages": [{"role": "robot", "content": "q"}]}',
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DistillInputError) as caught:
        load_prompts(path)
    assert [p.split(": ", 1)[0] for p in caught.value.problems] == [
        f"{path}:{n}" for n in (2, 3, 4, 5, 6)
    ]
    assert "assistant" in caught.value.problems[3] and "role" in caught.value.problems[4]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DistillInputError, match="no prompts"):
        load_prompts(empty)


def test_a_corrupt_line_before_the_end_of_the_output_is_refused(tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                    "content": "a"}]})  # fmt: skip
    out.write_text(f"{good}\nnot an example\n{good}\n")
    with pytest.raises(DistillInputError, match="out.jsonl:2"):
        read_answered(out)
    out.write_text(f"{good}\n{good[:-3]}")
    assert read_answered(out) == {messages_key([{"role": "user", "content": "q"}])}
    assert out.read_text() == f"{good}\n"


def test_settings_report_every_problem() -> None:
    with pytest.raises(ValueError) as caught:
        DistillSettings(
            teacher_url="ftp://x", teacher_model=" ", prompts=Path("p"), out=Path("o"),
            concurrency=0, retries=-1, timeout=0, refusal_patterns=("(",),
        )  # fmt: skip
    message = str(caught.value)
    for expected in ("teacher url", "teacher model", "concurrency", "retries", "timeout", "("):
        assert expected in message


def test_endpoint_and_redacted_url() -> None:
    def make(url: str) -> DistillSettings:
        return DistillSettings(teacher_url=url, teacher_model="m", prompts=Path("p"), out=Path("o"))

    assert make("http://h:8000").endpoint == "http://h:8000/v1/chat/completions"
    assert make("http://h:8000/v1/").endpoint == "http://h:8000/v1/chat/completions"
    hosted = make("https://user:pw@api.example.com/openai/v1?api-version=2")
    assert (
        hosted.endpoint
        == "https://user:pw@api.example.com/openai/v1/chat/completions?api-version=2"
    )
    assert hosted.redacted_url == "https://api.example.com/openai"


# --- the CLI ----------------------------------------------------------------------------------


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("distill")(distill_command)
    app.command("unused")(lambda: None)  # two commands: `distill` is then a subcommand
    return app


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli(), ["distill", *args], env=env)


def test_cli_exit_codes_and_json(fake_server, teacher, tmp_path) -> None:
    secret = "sk-from-the-environment"
    server = fake_server(api_keys=[secret])
    prompts = write_prompts(tmp_path / "p.jsonl", ["x", "y"])
    args = ["--teacher-model", "fake", "--prompts", str(prompts), "--max-tokens", "64"]
    out = ["--out", str(tmp_path / "o.jsonl")]
    env = {"TEACHER_KEY": secret, "OPENAI_API_KEY": ""}

    ok = invoke("--teacher-url", server.url, *args, *out, "--api-key-env", "TEACHER_KEY", env=env)
    assert ok.exit_code == 0, ok.output
    assert "2 written of 2 asked" in ok.stdout
    again = invoke("--teacher-url", server.url, *args, *out, "--json", "--api-key-env",
                   "TEACHER_KEY", env=env)  # fmt: skip
    assert json.loads(again.stdout)["counts"]["resumed"] == 2

    unset = invoke("--teacher-url", server.url, *args, *out, "--api-key-env", "NOPE", env=env)
    assert unset.exit_code == 2 and "NOPE is not set" in unset.stderr

    dead = f"http://127.0.0.1:{free_port()}"
    failed = invoke("--teacher-url", dead, *args, "--out", str(tmp_path / "f.jsonl"),
                    "--retries", "0", "--json", env=env)  # fmt: skip
    assert failed.exit_code == 1
    assert json.loads(failed.stdout)["counts"]["failed"] == {"connection": 2}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnope\n{"prompt": 3}\n')
    invalid = invoke("--teacher-url", server.url, "--teacher-model", "fake", "--prompts",
                     str(bad), *out, env=env)  # fmt: skip
    assert invalid.exit_code == 2
    assert invalid.stderr.startswith("error: ") and invalid.stderr.count("\n") == 1
    assert f"{bad}:2: not JSON" in invalid.stderr and f"{bad}:3:" in invalid.stderr
    missing = invoke("--teacher-url", server.url, "--teacher-model", "fake", "--prompts",
                     str(tmp_path / "absent.jsonl"), *out, env=env)  # fmt: skip
    assert missing.exit_code == 2 and "cannot read" in missing.stderr
    nonsense = invoke("--teacher-url", "nowhere", *args, *out, "--concurrency", "0", env=env)
    assert nonsense.exit_code == 2 and "concurrency" in nonsense.stderr


def test_cli_does_not_put_the_key_on_the_command_line() -> None:
    result = invoke("--help")
    assert "--api-key-env" in result.stdout and "--api-key " not in result.stdout


def test_ctrl_c_exits_130_with_complete_lines_and_the_run_recorded(fake_server, tmp_path) -> None:
    server = fake_server(engine=FakeEngine(token_delay=0.02))
    prompts = write_prompts(tmp_path / "p.jsonl", [f"q{i}" for i in range(60)])
    out = tmp_path / "o.jsonl"
    args = ["--teacher-url", server.url, "--teacher-model", "fake", "--max-tokens", "64"]
    args += ["--prompts", str(prompts), "--out", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-c", CLI_MAIN, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: out.exists() and out.read_text().count("\n") >= 3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "run the same command again" in stderr
    assert 3 <= len(examples(out)) < 60
    run = json.loads((tmp_path / "o.jsonl.meta.json").read_text())["runs"][-1]
    assert run["status"] == "interrupted" and run["counts"]["written"] == len(examples(out))
