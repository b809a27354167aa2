"""Rules about server/'s source that no runtime test would catch."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "server"


def test_server_code_has_no_assert_statements():
    """An `assert` on a request path answers a 500 (or, under `python -O`, nothing at all) where
    a domain error with a 4xx/5xx of its own belongs."""
    found = [
        f"{path.name}:{node.lineno}"
        for path in sorted(SERVER.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert found == []
