"""The alert rules and the Grafana dashboard: every expression parses as PromQL and selects only
metric names a live loraplex server exports on /metrics (its own and the engine's `vllm:*`),
and the Prometheus / Grafana provisioning files point at each other and at the server.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from tests.deploy.manifests import (
    ALERTS,
    DASHBOARD,
    DEPLOY,
    alert_rules,
    compose,
    compose_environment,
    dashboard_queries,
    exposed_names,
    grafana_to_promql,
    label_uses,
    metric_names,
    render,
    sample_labels,
)

# Series Prometheus makes itself for every target, not the server.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Labels Prometheus adds to every scraped series (kubernetes-scrape.yml adds namespace and pod).
TARGET_LABELS = {"job", "instance", "namespace", "pod"}


def used_metric_names() -> dict[str, set[str]]:
    """metric name -> where it is used (alert or panel)."""
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for title, expr in dashboard_queries(json.loads(DASHBOARD.read_text())):
        for name in metric_names(grafana_to_promql(expr)):
            used.setdefault(name, set()).add(f"panel {title!r}")
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        query = variable["query"]["query"]
        assert query.startswith("label_values("), variable["name"]
        name = query.removeprefix("label_values(").split(",")[0].strip()
        used.setdefault(name, set()).add(f"variable ${variable['name']}")
    return used


def missing_from(exposition: str) -> dict[str, set[str]]:
    exposed = exposed_names(exposition)
    return {
        name: where
        for name, where in sorted(used_metric_names().items())
        if name not in exposed and name not in PROMETHEUS_OWN
    }


def all_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every alert and panel."""
    queries = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    dashboard = json.loads(DASHBOARD.read_text())
    queries += [(f"panel {t!r}", grafana_to_promql(e)) for t, e in dashboard_queries(dashboard)]
    return queries


def populate(server) -> None:
    """Give every labelled family a sample, so its label names show on /metrics: one real chat
    request for the request families, the server's own instruments for the others (what a
    registry, an experiment and adapter loads would record)."""
    reply = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert reply.status_code == 200, reply.text
    metrics = server.app.state.loraplex.metrics
    ab = ("support", "2", "1", "1")
    metrics.observe_ab_request(
        adapter="support", version=2, experiment=1, variant=1, error=False, seconds=0.2,
        ttft=0.1, output_tokens=3, unanalysed="unkeyed",
    )  # fmt: skip
    metrics.observe_ab_request(
        adapter="support", version=2, experiment=1, variant=1, error=True, seconds=0.2,
        ttft=None, output_tokens=0, unanalysed=None,
    )  # fmt: skip
    metrics.ab_feedback.labels(*ab).inc()
    metrics.ab_feedback_score.labels(*ab).inc(0.5)
    metrics.ab_users.labels(*ab).set(3)
    metrics.ab_decisions.labels("support", "1", "hold").inc()
    metrics.observe_adapter_load("support@2", 0.3)
    metrics.observe_adapter_load("support@3", 0.3, ok=False)
    metrics.adapter_cache.labels("support@2", "hit").inc()
    metrics.adapter_warmup_failures.labels("support@3").inc()


def test_every_label_used_exists_on_its_metric(fake_server) -> None:
    """A `by (variant)` or `{status=...}` on a metric without that label gives an empty panel
    or an alert that never fires, silently."""
    server = fake_server()
    populate(server)
    labels = sample_labels(httpx.get(f"{server.url}/metrics").text)
    problems = []
    for where, expr in all_queries():
        for used, names in label_uses(expr):
            for name in names - PROMETHEUS_OWN:
                assert name in labels, f"{where}: no sample of {name} to check its labels"
                if missing := used - labels[name] - TARGET_LABELS:
                    problems.append(f"{where}: {name} has no label {sorted(missing)}")
    assert not problems, "\n".join(problems)


def test_every_metric_used_exists_on_a_live_server(fake_server) -> None:
    server = fake_server()
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200
    missing = missing_from(response.text)
    assert not missing, f"not exported by the server's /metrics: {missing}"


@pytest.mark.engine
def test_every_metric_used_exists_on_the_real_engine_server(real_server) -> None:
    """The same on the real vLLM engine, whose `vllm:*` families come from the engine itself."""
    response = httpx.get(f"{real_server.url}/metrics")
    assert response.status_code == 200
    missing = missing_from(response.text)
    assert not missing, f"not exported by the real engine server's /metrics: {missing}"


def test_the_dashboard_and_rules_use_the_engine_queue_and_registry_metrics() -> None:
    """What the issue asks the dashboard and the alerts to show is there at all."""
    used = used_metric_names()
    for name in (
        "vllm:num_requests_waiting",  # engine queue
        "loraplex_ab_feedback_score_sum_total",  # feedback mean per variant
        "loraplex_ab_time_to_first_token_seconds_bucket",
        "loraplex_time_to_first_token_seconds_bucket",
        "loraplex_adapter_cache_lookups_total",
        "loraplex_adapter_loads_total",
        "loraplex_registry_revision",
        "loraplex_registry_poll_errors_total",
        "loraplex_engine_ready",
    ):
        assert name in used, f"{name} is used by no panel or alert"


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert metric_names(rule["expr"]), f"{rule['alert']} selects no metric"
    # The four situations the rules must catch, each by the metric that shows it.
    by_metric = {name for rule in rules for name in metric_names(rule["expr"])}
    assert {"loraplex_ab_errors_total", "loraplex_ab_request_duration_seconds_bucket"} <= by_metric
    assert "loraplex_adapter_loads_total" in by_metric
    assert {"loraplex_registry_revision", "loraplex_registry_poll_errors_total"} <= by_metric
    assert "loraplex_engine_ready" in by_metric


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = []
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        ids.append(panel["id"])
        if panel["type"] != "row":
            assert panel["targets"], f"panel {panel['title']!r} has no query"
            assert panel["datasource"]["uid"] == _datasource()["uid"], panel["title"]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    boxes = [(p["title"], p["gridPos"]) for p in dashboard["panels"]]
    for i, (first, a) in enumerate(boxes):
        assert a["x"] + a["w"] <= 24, f"{first!r} is wider than the dashboard"
        for second, b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"]
            )  # fmt: skip
            assert apart, f"panels {first!r} and {second!r} overlap"
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for title, expr in dashboard_queries(dashboard):
        for used in {w.strip("${}") for w in expr.split() if w.startswith("$")}:
            assert used.startswith("__") or used in variables, f"{title!r}: unknown ${used}"


def _datasource() -> dict:
    path = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    (source,) = yaml.safe_load(path.read_text())["datasources"]
    return source


def test_provisioning_points_at_the_stack() -> None:
    """Grafana reads Prometheus at the compose service; Prometheus scrapes loraplex at its port
    and loads the alert rules at the path compose mounts them."""
    stack = compose()["services"]
    source = urlparse(_datasource()["url"])
    assert source.hostname in stack, f"datasource host {source.hostname} is no compose service"
    assert f"{source.port}:{source.port}" in stack[source.hostname]["ports"]

    provider_path = DEPLOY / "grafana" / "provisioning" / "dashboards" / "loraplex.yml"
    (provider,) = yaml.safe_load(provider_path.read_text())["providers"]
    mounts = dict(v.split(":")[:2][::-1] for v in stack["grafana"]["volumes"])
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"

    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    prometheus_mounts = dict(v.split(":")[:2][::-1] for v in stack["prometheus"]["volumes"])
    for rule_file in config["rule_files"]:
        assert (DEPLOY / prometheus_mounts[rule_file]).resolve() == ALERTS.resolve()
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in stack, f"scrape target {host} is no compose service"
    assert compose_environment(stack[host])["LORAPLEX_PORT"] == port
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_kubernetes_scrape_job_follows_the_deployment_annotations() -> None:
    job = yaml.safe_load((DEPLOY / "prometheus" / "kubernetes-scrape.yml").read_text())
    (scrape,) = job["scrape_configs"]
    deployment = next(o for o in render("gpu") if o["kind"] == "Deployment")
    template = deployment["spec"]["template"]
    keep = scrape["relabel_configs"][0]
    assert keep["action"] == "keep"
    # Prometheus names a pod label by replacing every character outside [a-zA-Z0-9_] with _.
    labels = {
        "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key): value
        for key, value in template["metadata"]["labels"].items()
    }
    assert ";".join(labels[source] for source in keep["source_labels"]) == keep["regex"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
    assert int(annotations["prometheus.io/port"]) in ports
    # The alert rules and prometheus-adapter tell replicas apart by these labels.
    targets = {r.get("target_label") for r in scrape["relabel_configs"]}
    assert {"namespace", "pod"} <= targets
