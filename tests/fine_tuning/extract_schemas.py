"""Cut the fine-tuning objects out of OpenAI's OpenAPI description (MIT licence).

    python -m tests.fine_tuning.extract_schemas PATH/TO/openapi.json COMMIT

reads the full document (github.com/openai/openai-openapi, `openapi.json`, MIT licence) and
writes `tests/conformance/openai-fine-tuning-subset.json`: the file, fine-tuning job, event and
checkpoint objects and their list responses, with everything they reference, descriptions and
examples dropped (the same stripping as tests/conformance/extract_subset.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conformance.extract_subset import _strip, closure

ROOTS = (
    "OpenAIFile",
    "ListFilesResponse",
    "DeleteFileResponse",
    "FineTuningJob",
    "FineTuningJobEvent",
    "FineTuningJobCheckpoint",
    "ListPaginatedFineTuningJobsResponse",
    "ListFineTuningJobEventsResponse",
    "ListFineTuningJobCheckpointsResponse",
)
OUT = Path(__file__).resolve().parents[1] / "conformance" / "openai-fine-tuning-subset.json"


def subset(full: dict, commit: str) -> dict:
    schemas = {name: _strip(s) for name, s in full["components"]["schemas"].items()}
    keep = closure(schemas, ROOTS)
    return {
        "openapi": full["openapi"],
        "info": {"title": "OpenAI API (fine-tuning subset)", "version": full["info"]["version"]},
        "x-loraplex-source": {
            "from": "https://github.com/openai/openai-openapi/blob/main/openapi.json",
            "commit": commit,
            "licence": "MIT (Copyright (c) OpenAI), see the source repository's LICENSE",
            "spec_version": full["info"]["version"],
            "roots": list(ROOTS),
        },
        "components": {"schemas": {name: schemas[name] for name in sorted(keep)}},
    }


def main() -> None:
    full = json.loads(Path(sys.argv[1]).read_text())
    OUT.write_text(json.dumps(subset(full, sys.argv[2]), indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
