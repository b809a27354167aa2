"""Print the conformance figures: requests generated from OpenAI's request schemas, sent to a
server on the fake engine, and what came back (tests/test_conformance.py runs a sample on
the real engine).

    .venv/bin/python tests/conformance/report.py [--cases 300]

Figures: cases per endpoint, the share answered 200, 5xx (must be 0), schema violations (must
be 0) and the refusals grouped by reason. The cases are the same on every run (derandomized).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conformance.harness import Tally, check_models, run_cases, source  # noqa: E402
from tests.conformance.servers import conformance_fake_server  # noqa: E402


def print_tally(name: str, tally: Tally) -> None:
    print(f"\n{name}: {tally.cases} cases, {tally.ok} answered 200 ({tally.share_ok():.1%}), "
          f"{tally.server_errors} 5xx, {len(tally.violations)} schema/shape violations")  # fmt: skip
    for reason, count in tally.reasons.most_common():
        print(f"  {count:4d}  {reason}")
    for violation in tally.violations[:20]:
        print(f"  VIOLATION {violation}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300, help="per endpoint")
    args = parser.parse_args()
    origin = source()
    print(f"OpenAI spec {origin['spec_version']} ({origin['from']} @ {origin['commit'][:12]})")
    with conformance_fake_server() as (url, models):
        total = Tally()
        for endpoint in ("chat", "completions"):
            tally = run_cases(url, endpoint, cases=args.cases, models=models)
            print_tally(endpoint, tally)
            total.cases += tally.cases
            total.ok += tally.ok
            total.server_errors += tally.server_errors
            total.violations += tally.violations
        models_tally = Tally()
        with httpx.Client(base_url=url) as client:
            check_models(client, models_tally)
        print_tally("models", models_tally)
    print(f"\nall: {total.cases} cases, {total.share_ok():.1%} answered 200, "
          f"{total.server_errors} 5xx, {len(total.violations)} violations")  # fmt: skip
    return 1 if total.server_errors or total.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
