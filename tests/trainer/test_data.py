"""trainer.data and `loraplex data`: every problem at once with its line, summaries, the
tokenizer length check on the embedded model, duplicates and overlap, the deterministic split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from trainer.data import (
    ChatExample,
    DatasetError,
    Message,
    PreferenceExample,
    example_key,
    read_dataset,
    split,
    validate,
)
from trainer.data_cli import data_app

runner = CliRunner()


def chat(user: str, assistant: str, *, system: str | None = None) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def write(path: Path, rows: list[Any]) -> Path:
    """One line per row: dicts as JSON, strings verbatim."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def found(problems: Any) -> set[tuple[int | None, str]]:
    return {(p.line, p.message) for p in problems}


def assert_reported(problems: Any, expected: list[tuple[int | None, str]]) -> None:
    """Each (line, fragment) is in some problem of that line; no line has problems not expected."""
    got = found(problems)
    for line, fragment in expected:
        assert any(n == line and fragment in m for n, m in got), (line, fragment, sorted(got))
    assert {n for n, _ in got} == {n for n, _ in expected}, sorted(got)


def test_every_chat_problem_is_reported_at_once_with_its_line(tmp_path: Path) -> None:
    user = {"role": "user", "content": "q"}
    path = write(
        tmp_path / "bad.jsonl",
        [
            chat("hello", "hi"),  # 1: fine
            '{"messages": [',  # 2
            "",  # 3: blank lines are ignored
            "[1, 2]",  # 4
            {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user"}, {"role": "assistant", "content": " \t "}]},  # 6
            {"messages": [user]},  # 7
            {"messages": [user, {"role": "assistant", "content": "a"}, user]},  # 8
            {
                "messages": [
                    user | {"weight": 1},
                    {"role": "assistant", "content": "a", "weight": 2},
                ]
            },
            {"messages": [user, {"role": "assistant", "content": "a", "weight": 0}]},  # 10
            {"prompt": "p", "chosen": "a", "rejected": "b"},  # 11
            chat("hello  ", "hi"),  # 12: line 1 up to whitespace
            {"text": "what?"},  # 13
            {"messages": []},  # 14
            "[" * 100_000 + "]" * 100_000,  # 15: deeper than the parser's stack
            '{"messages": ' + "1" * 5000 + "}",  # 16: longer than Python converts to int
        ],
    )
    report = validate(path, tokenizer_dir=None)
    assert not report.ok
    assert_reported(
        report.problems,
        [
            (2, "bad JSON"),
            (4, "not a JSON object"),
            (5, 'unknown role "tool"'),
            (6, "message 1 (user): missing content"),
            (6, "message 2 (assistant): empty content"),
            (7, "no assistant message"),
            (8, "the last message is user"),
            (9, "message 1 (user): 'weight' is only allowed on assistant messages"),
            (9, "weight must be 0 or 1, got 2"),
            (10, "every assistant message has weight 0"),
            (11, "mixed formats: a preference row, but line 1 is a chat row"),
            (12, "duplicate of line 1"),
            (13, "unknown row format"),
            (14, "non-empty list"),
            (15, "bad JSON"),
            (16, "bad JSON"),
        ],
    )
    assert [p.line for p in report.problems] == sorted(p.line for p in report.problems)
    assert str(report.problems[0]).startswith("line 2: bad JSON")
    assert [e.line for e in report.dataset.examples] == [1, 12]  # duplicates parse fine


def test_every_preference_problem_is_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path / "pref.jsonl",
        [
            {"prompt": "p", "chosen": "good", "rejected": "bad"},
            {"prompt": "p", "chosen": "good"},
            {"chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same  answer", "rejected": "same answer"},
            {"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
            {"prompt": "", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "completion": "c"},
        ],
    )
    dataset = read_dataset(path)
    assert dataset.kind == "preference"
    assert_reported(
        dataset.problems,
        [
            (2, "preference row missing 'rejected'"),
            (3, "preference row missing 'prompt'"),
            (4, "chosen and rejected are identical"),
            (5, "chosen message 1: role must be assistant, got user"),
            (6, "'prompt' is empty"),
            (7, "mixed formats: a prompt/completion row, but line 1 is a preference row"),
        ],
    )


def test_openai_dpo_rows_are_preference_examples_and_every_problem_is_reported(
    tmp_path: Path,
) -> None:
    def row(messages, preferred, non_preferred, **extra):
        return {"input": {"messages": messages, **extra},
                "preferred_output": [{"role": "assistant", "content": preferred}],
                "non_preferred_output": [{"role": "assistant", "content": non_preferred}]}  # fmt: skip

    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Hi?"}
    path = write(
        tmp_path / "dpo.jsonl",
        [
            row([system, user], "HELLO", "hello", tools=[], parallel_tool_calls=True),  # 1
            {
                "input": {"messages": [user]},
                "preferred_output": [{"role": "assistant", "content": "a"}],
            },  # 2
            row([user, {"role": "assistant", "content": "a"}], "b", "c"),  # 3
            row([user], "same  answer", "same answer"),  # 4
            {"input": "Hi?", "preferred_output": [], "non_preferred_output": [user]},  # 5
            row([user], "x", "y", tools=[{"type": "function"}]),  # 6
            {"prompt": "p", "chosen": "a", "rejected": "b"},  # 7
        ],
    )
    dataset = read_dataset(path)
    assert dataset.kind == "preference"
    assert_reported(
        dataset.problems,
        [
            (2, "preference row missing 'non_preferred_output'"),
            (3, "the last input message is assistant"),
            (4, "preferred_output and non_preferred_output are identical"),
            (5, "'input' must be an object with 'messages'"),
            (5, "'preferred_output' must be a non-empty list of messages"),
            (5, "non_preferred_output message 1: role must be assistant, got user"),
            (6, "'input.tools' is not supported"),
            (7, "mixed formats: a preference row, but line 1 is a preference (OpenAI) row"),
        ],
    )
    [first] = dataset.examples
    assert [(m.role, m.content) for m in first.prompt] == [("system", "Be brief."), ("user", "Hi?")]
    assert [m.content for m in first.chosen] == ["HELLO"]
    assert [m.content for m in first.rejected] == ["hello"]


def test_a_row_of_the_wrong_kind_is_a_problem_when_the_kind_is_given(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [chat("q", "a"), {"prompt": "p", "completion": "c"}])
    dataset = read_dataset(path, kind="preference")
    assert dataset.kind == "preference"
    assert_reported(
        dataset.problems,
        [(1, "a chat row in a preference dataset"), (2, "a prompt/completion row in a preference")],
    )
    with pytest.raises(ValueError, match="kind must be"):
        read_dataset(path, kind="sft")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "file not found"),
        (b"", "empty file"),
        (b"\n  \n\n", "empty file"),
        (
            json.dumps(chat("q", "a")).encode() + b'\n{"x": "\xff"}\n',
            "not UTF-8: byte 0xff on line 2",
        ),
    ],
)
def test_file_level_problems(tmp_path: Path, content: bytes | None, expected: str) -> None:
    path = tmp_path / "f.jsonl"
    if content is not None:
        path.write_bytes(content)
    report = validate(path, tokenizer_dir=None)
    assert [(p.line, expected in p.message) for p in report.problems] == [(None, True)]
    assert str(report.problems[0]) == report.problems[0].message


def test_a_clean_file_has_no_problems_and_a_correct_summary(tmp_path: Path) -> None:
    rows = [
        chat("What is 2+2?", "4", system="Be brief."),
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "weight": 0},
                {"role": "user", "content": "Name a colour"},
                {"role": "assistant", "content": "Blue", "weight": 1},
            ]
        },
        chat("Capital of France?", "Paris"),
        chat("Say yes", "Yes"),
    ]
    path = write(tmp_path / "clean.jsonl", rows)
    path.write_bytes(path.read_bytes() + b"\n\n")  # trailing blank lines
    report = validate(path, tokenizer_dir=None)
    assert report.ok, report.problems
    s = report.summary
    assert (s["examples"], s["kind"], s["problems"]) == (4, "chat", 0)
    assert s["turns"] == {"mean": 2.5, "max": 4}  # 2, 4, 2, 2 non-system messages
    assert s["system_share"] == 0.25
    assert s["length_check"].startswith("skipped") and s["tokens"] is None
    assert len(s["sha256"]) == 64
    second = report.dataset.examples[1]
    assert isinstance(second, ChatExample)
    assert second.to_json() == rows[1]
    assert report.to_json()["ok"] is True


def test_prompt_completion_and_preference_rows_become_examples(tmp_path: Path) -> None:
    pc = read_dataset(write(tmp_path / "pc.jsonl", [{"prompt": "Q?", "completion": "A."}]))
    assert pc.kind == "chat" and not pc.problems
    assert pc.examples == (ChatExample(1, (Message("user", "Q?"), Message("assistant", "A."))),)
    assert example_key(pc.examples[0]) == example_key(
        read_dataset(write(tmp_path / "c.jsonl", [chat("Q?", "A.")])).examples[0]
    )
    system = {"role": "system", "content": "Be kind."}
    pref_rows = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {
            "prompt": [system, {"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "No."}],
        },
    ]
    pref = validate(write(tmp_path / "pref.jsonl", pref_rows), tokenizer_dir=None)
    assert pref.ok, pref.problems
    plain, chat_form = pref.dataset.examples
    assert plain == PreferenceExample(
        1,
        (Message("user", "Hi"),),
        (Message("assistant", "Hello!"),),
        (Message("assistant", "Go away."),),
    )
    assert isinstance(chat_form, PreferenceExample)
    assert chat_form.to_json() == pref_rows[1]
    assert pref.summary["system_share"] == 0.5
    assert pref.summary["kind"] == "preference"


def test_duplicates_and_overlap_with_the_validation_file(tmp_path: Path) -> None:
    train = write(
        tmp_path / "train.jsonl",
        [chat("a", "1"), chat("b", "2"), chat("a", "1"), chat("c", "3"), chat(" a ", "1 ")],
    )
    val = write(tmp_path / "val.jsonl", [chat("z", "9"), chat("c", "3"), chat("c", "3"), "oops"])
    report = validate(train, tokenizer_dir=None, val=val)
    assert_reported(
        report.problems,
        [
            (None, f"validation file {val}: line 4: bad JSON"),
            (3, "duplicate of line 1"),
            (5, "duplicate of line 1"),
            (4, f"also in {val} at lines 2, 3"),
        ],
    )
    # weights do not make two examples different
    w = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "1", "weight": 1},
        ]
    }
    assert example_key(read_dataset(write(tmp_path / "w.jsonl", [w])).examples[0]) == example_key(
        read_dataset(train).examples[0]
    )


def test_length_check_counts_tokens_with_the_models_chat_template(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    short, long = chat("Hi", "Hello"), chat("Tell me a story.", " ".join(["word"] * 120))
    path = write(tmp_path / "len.jsonl", [short, long, short | {"messages": short["messages"][:1]}])
    report = validate(path, tokenizer_dir=embedded_model_dir, max_seq_len=64)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    expected = [
        len(tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"])
        for row in (short, long)
    ]
    assert expected[0] <= 64 < expected[1]
    assert_reported(
        report.problems,
        [(2, f"too long: {expected[1]} tokens after the chat template, max 64"), (3, "assistant")],
    )
    s = report.summary
    assert s["length_check"] == "done" and s["tokenizer"] == str(embedded_model_dir)
    assert s["tokens_total"] == sum(expected)
    assert s["tokens"] == {
        "p50": expected[0],
        "p90": expected[1],
        "p99": expected[1],
        "max": expected[1],
    }
    assert validate(path, tokenizer_dir=embedded_model_dir, max_seq_len=4096).problems[0].line == 3
    with pytest.raises(ValueError, match="model folder not found"):
        validate(path, tokenizer_dir=tmp_path / "nowhere")


def many(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    return [chat(f"{prefix} {i}", f"answer {i}") for i in range(n)]


def test_split_is_deterministic_and_keeps_the_fraction(tmp_path: Path) -> None:
    path = write(tmp_path / "data.jsonl", many(40))
    train, val = split(path, val_fraction=0.25, seed=7)
    assert (train, val) == (tmp_path / "data.train.jsonl", tmp_path / "data.val.jsonl")
    again = split(path, val_fraction=0.25, seed=7, out_dir=tmp_path / "again")
    assert [p.read_bytes() for p in again] == [train.read_bytes(), val.read_bytes()]
    other = split(path, val_fraction=0.25, seed=8, out_dir=tmp_path / "other")
    assert other[1].read_bytes() != val.read_bytes()
    train_lines, val_lines = train.read_text().splitlines(), val.read_text().splitlines()
    assert len(val_lines) == 10 and len(train_lines) == 30
    original = path.read_text().splitlines()
    assert sorted(train_lines + val_lines) == sorted(original)  # verbatim, nothing lost
    assert train_lines == [line for line in original if line in set(train_lines)]  # file order
    assert not read_dataset(train).problems and not read_dataset(val).problems


def test_split_keeps_duplicates_together_and_each_side_non_empty(tmp_path: Path) -> None:
    rows = many(12)
    rows += [rows[0], rows[0], chat("q  1", "answer 1"), rows[5]]
    path = write(tmp_path / "dups.jsonl", rows)
    for seed in range(10):
        train, val = split(path, val_fraction=0.3, seed=seed, out_dir=tmp_path / str(seed))
        sides = {
            example_key(e): side
            for side, p in (("train", train), ("val", val))
            for e in read_dataset(p).examples
        }
        keys = [example_key(e) for e in read_dataset(path).examples]
        assert len(sides) == len(set(keys)) == 12  # no key on both sides
        n_val = len(read_dataset(val).examples)
        assert n_val == round(0.3 * len(rows))  # nine single examples fill the target
    two = write(tmp_path / "two.jsonl", [chat("a", "1"), chat("b", "2"), chat("a", "1")])
    train, val = split(two, val_fraction=0.01, seed=0)
    assert len(read_dataset(train).examples) >= 1 and len(read_dataset(val).examples) >= 1


def test_split_refuses_bad_input(tmp_path: Path) -> None:
    bad = write(
        tmp_path / "bad.jsonl",
        [chat("a", "1"), "nope", {"messages": [{"role": "user", "content": "x"}]}],
    )
    with pytest.raises(DatasetError, match="2 problem") as caught:
        split(bad, val_fraction=0.5, seed=0)
    assert [p.line for p in caught.value.problems] == [2, 3]
    assert not (tmp_path / "bad.train.jsonl").exists()
    one = write(tmp_path / "one.jsonl", [chat("a", "1"), chat("a", "1")])
    with pytest.raises(ValueError, match="at least 2"):
        split(one, val_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        split(bad, val_fraction=1.0, seed=0)


def test_cli_validate_exit_codes_text_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))  # no prepared model there
    clean = write(tmp_path / "clean.jsonl", many(3))
    result = runner.invoke(data_app, ["validate", str(clean)])
    assert result.exit_code == 0, result.output
    assert "3 chat example(s), 0 problem(s)" in result.output
    assert "length check skipped" in result.output and "loraplex model prepare" in result.output

    bad = write(tmp_path / "bad.jsonl", [*many(2), "{", many(1)[0]])
    result = runner.invoke(data_app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert (
        f"{bad}:3: bad JSON" in result.output and f"{bad}:4: duplicate of line 1" in result.output
    )

    result = runner.invoke(data_app, ["validate", str(bad), "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and [p["line"] for p in doc["problems"]] == [3, 4]
    assert doc["summary"]["examples"] == 3 and "skipped" in doc["summary"]["length_check"]

    result = runner.invoke(data_app, ["validate", str(clean), "--model", str(tmp_path / "none")])
    assert result.exit_code == 2 and result.stderr.startswith("error: model folder not found")


def test_cli_validate_with_a_model_and_a_validation_file(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    train = write(tmp_path / "t.jsonl", many(4))
    val = write(tmp_path / "v.jsonl", many(2, prefix="other") + [many(4)[2]])
    args = ["validate", str(train), "--model", str(embedded_model_dir), "--val", str(val)]
    result = runner.invoke(data_app, [*args, "--max-seq-len", "4096"])
    assert result.exit_code == 1, result.output
    assert f"{train}:3: also in {val} at line 3" in result.output
    assert "tokens:" in result.output and "p99" in result.output


def test_cli_split(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", many(20))
    out = tmp_path / "out"
    args = ["split", str(path), "--val-fraction", "0.2", "--seed", "3", "--out-dir", str(out)]
    result = runner.invoke(data_app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["train"] == {"path": str(out / "d.train.jsonl"), "examples": 16}
    assert doc["val"] == {"path": str(out / "d.val.jsonl"), "examples": 4}
    text = runner.invoke(data_app, args)
    assert text.exit_code == 0 and f"{out / 'd.val.jsonl'}  4 example(s)" in text.output

    bad = write(tmp_path / "bad.jsonl", [*many(3), "[]"])
    result = runner.invoke(data_app, ["split", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:4: not a JSON object" in result.stderr
    assert "error: " in result.stderr and "nothing written" in result.stderr
    result = runner.invoke(data_app, ["split", str(path), "--val-fraction", "0"])
    assert result.exit_code == 2 and "val_fraction" in result.stderr
