"""deploy/kubernetes/gie/: the Gateway API Inference Extension examples are valid objects of the
upstream CRDs they were written for (copies in deploy/kubernetes/gie/upstream-crds/: GIE v1.6.0,
llm-d-router v0.9.0), and they point at what loraplex really runs: the server pods' labels, the
container port, the /metrics route, the pool and EPP names the upstream chart makes."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from registry.refs import parse_ref
from server.app import create_app
from server.engine_fake import FakeEngine
from server.metrics import ServerMetrics
from server.targets import LocalAdapters
from tests.deploy.manifests import KUBERNETES, find, load_all, render, run_tool

GIE = KUBERNETES / "gie"
CRDS = GIE / "upstream-crds"
POOL_GROUP = "inference.networking.k8s.io"
EPP_PORT = 9002  # the chart's router.epp.extProcPort default


def crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version of the copied CRDs."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"]:
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def examples() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(GIE.glob("*.yaml"))
        if path.name not in ("kustomization.yaml", "epp-values.yaml")
        for doc in load_all(path)
    ]


def pool() -> dict[str, Any]:
    return find(examples(), "InferencePool")


def epp_values() -> dict[str, Any]:
    return yaml.safe_load((GIE / "epp-values.yaml").read_text(encoding="utf-8"))["router"]


def test_every_example_is_a_valid_object_of_its_upstream_crd():
    schemas = crds()
    assert {kind for _, kind in schemas} == {
        "InferencePool", "InferenceModelRewrite", "InferenceObjective",
    }  # fmt: skip
    kinds = set()
    for obj in examples():
        if obj["kind"] == "HTTPRoute":
            assert obj["apiVersion"] == "gateway.networking.k8s.io/v1"
            continue
        key = (obj["apiVersion"], obj["kind"])
        assert key in schemas, f"{key} is not a served version of the upstream CRDs"
        jsonschema.validate(obj, schemas[key])
        kinds.add(obj["kind"])
    assert kinds == {"InferencePool", "InferenceModelRewrite", "InferenceObjective"}
    assert pool()["apiVersion"] == f"{POOL_GROUP}/v1"


def test_the_schema_check_catches_a_wrong_field():
    bad = pool()
    bad["spec"]["targetPorts"] = [{"number": 70000}]  # the CRD caps port numbers at 65535
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crds()[(bad["apiVersion"], "InferencePool")])


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_the_pool_selects_the_server_pods_and_only_them(overlay: str):
    objects = render(overlay)
    selector = pool()["spec"]["selector"]["matchLabels"]
    assert set(pool()["spec"]["selector"]) == {"matchLabels"}
    for obj in objects:
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        labels = obj["spec"]["template"]["metadata"]["labels"]
        selected = selector.items() <= labels.items()
        assert selected == (obj["kind"] == "Deployment" and obj["metadata"]["name"] == "loraplex")
    jobs = [o for p in sorted((KUBERNETES / "examples").glob("*.yaml")) for o in load_all(p)]
    for job in (o for o in jobs if o.get("kind") == "Job"):  # the training Job template too
        assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_the_target_port_is_the_port_the_server_listens_on(overlay: str):
    objects = render(overlay)
    deployment = find(objects, "Deployment", "loraplex")
    container = next(
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "loraplex"
    )
    settings = find(objects, "ConfigMap")["data"]
    port = int(settings["LORAPLEX_PORT"])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert pool()["spec"]["targetPorts"] == [{"number": port}]
    assert epp_values()["modelServers"]["targetPorts"] == [{"number": port}]


def test_the_chart_values_make_the_same_pool_and_turn_on_lora_affinity():
    values, spec = epp_values(), pool()["spec"]
    assert values["modelServers"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert values["modelServers"]["type"] == "vllm"
    assert values["inferencePool"] == {
        "create": True,
        "failureMode": spec["endpointPickerRef"]["failureMode"],
    }
    # The chart names the pool after the release and the EPP Service "<release>-epp".
    name = pool()["metadata"]["name"]
    assert spec["endpointPickerRef"]["name"] == f"{name}-epp"
    assert spec["endpointPickerRef"]["port"] == {"number": EPP_PORT}
    assert f"helm install {name} " in (GIE / "epp-values.yaml").read_text(encoding="utf-8")
    config = yaml.safe_load(
        values["epp"]["pluginsCustomConfig"][values["epp"]["pluginsConfigFile"]]
    )
    assert config["apiVersion"] == "llm-d.ai/v1alpha1" and config["kind"] == "EndpointPickerConfig"
    declared = {p["type"] for p in config["plugins"]}
    assert {"lora-affinity-scorer", "metrics-data-source", "core-metrics-extractor"} <= declared
    (profile,) = config["schedulingProfiles"]
    used = {ref["pluginRef"] for ref in profile["plugins"]}
    assert "lora-affinity-scorer" in used and used <= declared


def app_paths() -> set[str]:
    engine, metrics = FakeEngine(), ServerMetrics(CollectorRegistry())
    resolver = LocalAdapters(engine, base_name="fake", adapters={}, metrics=metrics)
    app = create_app(engine=engine, resolver=resolver, metrics=metrics)
    return {route.path for route in app.routes}


def test_the_epp_scrapes_a_path_the_server_serves_and_the_route_covers_the_api():
    paths = app_paths()
    values = epp_values()["epp"]
    config = yaml.safe_load(values["pluginsCustomConfig"][values["pluginsConfigFile"]])
    source = next(p for p in config["plugins"] if p["type"] == "metrics-data-source")
    assert source["parameters"]["path"] == values["metricsDataSource"]["path"] == "/metrics"
    assert "/metrics" in paths
    route = find(examples(), "HTTPRoute")
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {"group": POOL_GROUP, "kind": "InferencePool", "name": pool()["metadata"]["name"]}
    ]
    (match,) = rule["matches"]
    prefix = match["path"]["value"]
    assert match["path"]["type"] == "PathPrefix"
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models"):
        assert path in paths and path.startswith(prefix)


def test_the_traffic_split_sends_a_name_to_pinned_versions_of_it():
    pool_name = pool()["metadata"]["name"]
    rewrite = find(examples(), "InferenceModelRewrite")
    objective = find(examples(), "InferenceObjective")
    for obj in (rewrite, objective):
        assert obj["spec"]["poolRef"]["name"] == pool_name
        assert obj["spec"]["poolRef"].get("group", POOL_GROUP) == POOL_GROUP
    (rule,) = rewrite["spec"]["rules"]
    (match,) = rule["matches"]
    incoming = parse_ref(match["model"]["value"])
    assert incoming.alias == "production" and "@" not in match["model"]["value"]
    targets = [parse_ref(t["modelRewrite"]) for t in rule["targets"]]
    assert {t.name for t in targets} == {incoming.name}
    assert all(t.version is not None for t in targets)  # versions, never aliases
    assert len({t.version for t in targets}) == len(targets) >= 2
    weights = [t.get("weight") for t in rule["targets"]]
    assert all(w is not None for w in weights)  # all or none, says the CRD


def test_the_kustomization_renders_the_route_split_and_objective():
    result = run_tool("kubectl", "kustomize", str(GIE))
    assert result.returncode == 0, result.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc)
    assert kinds == ["HTTPRoute", "InferenceModelRewrite", "InferenceObjective"]
