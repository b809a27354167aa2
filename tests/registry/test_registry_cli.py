"""`loraplex registry ...` end to end: the issue's release flow with text and --json output,
one-line errors with exit codes 2 (the request) and 1 (the database), and light imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraplex.cli import app

LORAPLEX = str(Path(sys.executable).with_name("loraplex"))


@pytest.fixture
def cli(database_url, tmp_path):
    """Run `loraplex registry ARGS` against this test's database and artifact folder."""
    runner = CliRunner()
    stores = ["--registry", database_url, "--artifacts", (tmp_path / "artifacts").as_uri()]

    def invoke(*args: str, json_output: bool = False):
        command, *rest = args
        extra = ["--json"] if json_output else []
        result = runner.invoke(app, ["registry", command, *rest, *stores, *extra])
        if json_output and result.exit_code == 0:
            result.data = json.loads(result.stdout)
        return result

    return invoke


def test_the_release_flow(cli, make_adapter):
    v1, v2 = make_adapter(), make_adapter()
    first = cli("register", "support", str(v1), "--tag", "dataset=tickets-2026-10")
    assert (first.exit_code, first.stdout) == (0, "support@1\n")
    promoted = cli("promote", "support", "1", "--reason", "first release", "--actor", "ana")
    assert promoted.stdout == "support@production -> 1 (was unset)\n"
    second = cli("register", "support", str(v2), json_output=True)
    assert second.data["ref"] == "support@2" and second.data["tags"] == {}
    assert cli("promote", "support", "2", "--alias", "staging").exit_code == 0
    moved = cli("promote", "support", "2", "--reason", "eval +4%", json_output=True)
    assert (moved.data["from"], moved.data["to"], moved.data["kind"]) == (1, 2, "promote")
    back = cli("rollback", "support", "--reason", "complaints", "--actor", "bo")
    assert back.stdout == "support@production -> 1 (rolled back from 2)\n"

    history = cli("history", "support", json_output=True).data
    assert [(m["alias"], m["from"], m["to"], m["actor"], m["reason"]) for m in history][-1] == (
        "production",
        2,
        1,
        "bo",
        "complaints",
    )
    assert len(history) == 4 and history[0]["actor"] == "ana"
    assert [
        m["to"] for m in cli("history", "support", "--alias", "staging", json_output=True).data
    ] == [2]
    text = cli("history", "support").stdout
    assert "first release" in text and "complaints" in text and "rollback" in text

    listed = cli("list", json_output=True).data
    assert listed == [listed[0]] and listed[0]["aliases"] == {"production": 1, "staging": 2}
    assert listed[0]["versions"] == [1, 2] and listed[0]["latest"] == 2
    assert "production->1, staging->2" in cli("list").stdout
    shown = cli("show", "support@production", json_output=True).data
    assert (shown["ref"], shown["aliases"], shown["tags"]) == (
        "support@1",
        ["production"],
        {"dataset": "tickets-2026-10"},
    )
    assert cli("show", "support@2", json_output=True).data["aliases"] == ["staging"]
    assert "sha256:" in cli("show", "support").stdout


def test_errors_are_one_line_with_exit_code_two(cli, make_adapter):
    cli("register", "support", str(make_adapter()))
    cases = {
        ("show", "support@canary"): "error: support has no alias 'canary'",
        ("show", "support"): "error: support has no alias 'production'; versions: 1.",
        ("promote", "support", "3"): "error: support has no version 3; versions: 1",
        ("rollback", "support"): "error: support@production has never been set",
        ("history", "ghost"): "error: no adapter named 'ghost'; adapters: support.",
        ("register", "support", str(make_adapter(rank=64))): "error: support rejected (1 problem)",
        ("register", "support", "x", "--tag", "novalue"): "error: --tag expects KEY=VALUE",
        ("show", "a b"): "error: invalid adapter name 'a b'",
    }
    for args, expected in cases.items():
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stdout == ""
        assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr


def test_every_validation_problem_is_on_the_one_line(cli, make_adapter):
    bad = make_adapter(rank=64, config={"use_dora": True})
    result = cli("register", "support", str(bad), json_output=True)
    assert result.exit_code == 2 and "rank 64 is above" in result.stderr and "DoRA" in result.stderr
    assert cli("list", json_output=True).data == []


def test_store_errors_exit_with_code_one_or_two(tmp_path):
    runner = CliRunner()
    unreachable = runner.invoke(
        app, ["registry", "list", "--registry", "postgresql+psycopg://nobody@127.0.0.1:1/none"]
    )
    assert unreachable.exit_code == 1
    assert unreachable.stderr.startswith("error: cannot open registry database")
    scheme = runner.invoke(
        app, ["registry", "list", "--home", str(tmp_path), "--artifacts", "gs://bucket"]
    )
    assert scheme.exit_code == 2 and "known schemes: file://, s3://" in scheme.stderr


def test_the_command_runs_without_heavy_imports(tmp_path, make_adapter):
    home = str(tmp_path / "home")
    registered = subprocess.run(
        [LORAPLEX, "registry", "register", "light", str(make_adapter()), "--home", home],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (registered.returncode, registered.stdout) == (0, "light@1\n"), registered.stderr
    code = (
        "import sys\n"
        "from loraplex.cli import app\n"
        f"try: app(['registry', 'promote', 'light', '1', '--home', {home!r}])\n"
        "except SystemExit as e: assert e.code in (0, None), e.code\n"
        "heavy = {'torch', 'vllm', 'transformers', 'boto3'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    promoted = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout == "light@production -> 1 (was unset)\n"
    missing = subprocess.run(
        [LORAPLEX, "registry", "show", "ghost", "--home", home],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr == (
        "error: no adapter named 'ghost'; adapters: light. "
        "Register one: loraplex registry register ghost PATH\n"
    )
