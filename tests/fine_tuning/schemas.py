"""Validation against the vendored OpenAI fine-tuning schemas (openai-fine-tuning-subset.json)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SUBSET = Path(__file__).resolve().parents[1] / "conformance" / "openai-fine-tuning-subset.json"


@cache
def _document() -> dict[str, Any]:
    return json.loads(SUBSET.read_text())


def problems(obj: Any, schema: str) -> list[str]:
    """Every way `obj` breaks OpenAI's schema `schema` (empty: it conforms)."""
    document = _document() | {"$ref": f"#/components/schemas/{schema}"}
    validator = Draft202012Validator(document)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
    ]


def check(obj: Any, schema: str) -> Any:
    """`obj` as given, after asserting that it conforms to `schema`."""
    found = problems(obj, schema)
    assert found == [], (schema, found, obj)
    return obj
