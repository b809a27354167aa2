"""Prometheus' own checker on deploy/prometheus: the rule file and the compose stack's config are
valid for Prometheus, and the alert rules' unit tests (alerts_test.yml: series in, alerts with
their labels and annotations out) pass. promtool is Debian's `prometheus` package, which
.ci/run installs; without it these tests skip (fail when CI is set)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.manifests import ALERTS, DEPLOY


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is not installed: apt-get install prometheus (Debian's package)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message)
        pytest.skip(message)
    return found


def run(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_alert_rules_pass_promtool_check() -> None:
    result = run("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_unit_tests_pass() -> None:
    tests = DEPLOY / "prometheus" / "alerts_test.yml"
    covered = {
        case["alertname"]
        for test in yaml.safe_load(tests.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    for alert in (
        "LoraplexVariantErrorRateRegression",
        "LoraplexVariantLatencyRegression",
        "LoraplexAdapterLoadFailures",
        "LoraplexRegistryRevisionLagging",
        "LoraplexRegistryPollErrors",
        "LoraplexEngineNotReady",
    ):
        assert alert in covered, f"alerts_test.yml does not test {alert}"
    result = run("test", "rules", tests.name, cwd=tests.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_prometheus_config_passes_promtool_check(tmp_path) -> None:
    """prometheus.yml as the compose container sees it: the rule file at its mounted path."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert len(config["rule_files"]) == 1
    config["rule_files"] = [str(ALERTS)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = run("check", "config", str(local))
    assert result.returncode == 0, result.stdout + result.stderr
