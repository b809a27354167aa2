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
    return _exclusive_bounds(json.loads(SUBSET.read_text()))


def _exclusive_bounds(node: Any) -> Any:
    """`node` with OpenAPI 3.0's boolean bounds in JSON Schema 2020-12's numeric form.

    OpenAI's document says 3.1 but writes some bounds the 3.0 way (`"minimum": 0,
    "exclusiveMinimum": true`: greater than 0). A 2020-12 validator reads `true` as the number 1,
    so it would refuse a DPO beta of 0.1 or a learning-rate multiplier of 0.5 that OpenAI accepts.
    """
    if isinstance(node, list):
        return [_exclusive_bounds(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _exclusive_bounds(value) for key, value in node.items()}
    for exclusive, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(exclusive), bool):
            if node.pop(exclusive) and inclusive in node:
                node[exclusive] = node.pop(inclusive)
    return node


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
