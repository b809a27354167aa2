"""Cut the subset of OpenAI's OpenAPI description that the conformance tests use.

    python tests/conformance/extract_subset.py PATH/TO/openapi.json [COMMIT]

reads the full document (github.com/openai/openai-openapi, `openapi.json`) and writes
`openai-subset.json` beside this file: the request and response schemas of chat completions,
text completions and the model list, with everything they reference, descriptions and examples
dropped. The request side is cut to what a text model serves; each cut is listed in the file's
`x-loraplex-source.cuts` (function calling, audio, and non-text content parts are refused by
this server, so generating them would only measure refusals OpenAI's text models give too).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOTS = (
    "CreateChatCompletionRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionRequest",
    "CreateCompletionResponse",
    "ListModelsResponse",
)
DROPPED_KEYS = {"description", "example", "examples", "title", "x-oaiMeta", "x-oaiExpandable"}
# (schema, JSON path inside it, what is removed there, why)
CUTS = (
    ("CreateChatCompletionRequest", ("allOf", 1, "properties"), "audio", "audio output"),
    ("CreateChatCompletionRequest", ("allOf", 1, "properties"), "tools", "function calling"),
    ("CreateChatCompletionRequest", ("allOf", 1, "properties"), "tool_choice", "function calling"),
    ("CreateChatCompletionRequest", ("allOf", 1, "properties"), "functions", "function calling"),
    (
        "CreateChatCompletionRequest",
        ("allOf", 1, "properties"),
        "function_call",
        "function calling",
    ),
    ("ChatCompletionRequestAssistantMessage", ("properties",), "tool_calls", "function calling"),
    ("ChatCompletionRequestAssistantMessage", ("properties",), "function_call", "function calling"),
    ("ChatCompletionRequestAssistantMessage", ("properties",), "audio", "audio"),
)


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in DROPPED_KEYS}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value.rsplit("/", 1)[-1]
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _only_text_parts(schemas: dict) -> list[str]:
    """Non-text content parts of user messages, and the deprecated function message, go."""
    user = schemas["ChatCompletionRequestUserMessageContentPart"]
    user["oneOf"] = [p for p in user["oneOf"] if p["$ref"].endswith("ContentPartText")]
    message = schemas["ChatCompletionRequestMessage"]
    message["oneOf"] = [m for m in message["oneOf"] if not m["$ref"].endswith("FunctionMessage")]
    return [
        "ChatCompletionRequestUserMessageContentPart: image, audio and file parts",
        "ChatCompletionRequestMessage: the deprecated function message",
    ]


def subset(full: dict, commit: str) -> dict:
    schemas = {name: _strip(s) for name, s in full["components"]["schemas"].items()}
    cuts = []
    for name, path, key, why in CUTS:
        node = schemas[name]
        for step in path:
            node = node[step]
        del node[key]
        cuts.append(f"{name}.{key}: {why}")
    cuts += _only_text_parts(schemas)
    keep = closure(schemas, ROOTS)
    return {
        "openapi": full["openapi"],
        "info": {"title": "OpenAI API (subset)", "version": full["info"]["version"]},
        "x-loraplex-source": {
            "from": "https://github.com/openai/openai-openapi/blob/main/openapi.json",
            "commit": commit,
            "spec_version": full["info"]["version"],
            "cuts": cuts,
        },
        "components": {"schemas": {name: schemas[name] for name in sorted(keep)}},
    }


def main() -> None:
    full = json.loads(Path(sys.argv[1]).read_text())
    commit = sys.argv[2] if len(sys.argv) > 2 else "unknown"
    out = Path(__file__).with_name("openai-subset.json")
    out.write_text(json.dumps(subset(full, commit), indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()


def closure(schemas: dict, roots) -> set[str]:
    """The named schemas and every schema they reference, transitively."""
    keep, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(_refs(schemas[name]))
    return keep
