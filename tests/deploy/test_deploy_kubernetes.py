"""The Kubernetes manifests: both overlays render with kubectl's kustomize and validate against the
Kubernetes schemas, and what would break silently in a cluster is checked against the app itself:
probe paths and ports, LORAPLEX_* names and values, selectors, per-pod cache volume, drain time,
images, the GPU request, the Jobs' commands, the autoscaler's metric.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from server.settings import ServeSettings
from tests.deploy.manifests import (
    EXAMPLES,
    KUBERNETES,
    OVERLAYS,
    containers,
    dockerfile_env,
    example_objects,
    exposed_names,
    find,
    parse_loraplex_command,
    render,
    settings_from,
)

# Oldest Kubernetes the manifests are meant for, and the newest schemas installed.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SETTINGS = {f"LORAPLEX_{name.upper()}" for name in ServeSettings.model_fields}
SECRET = find(example_objects(), "Secret")


def server_container(objects: list[dict]) -> dict:
    (container,) = find(objects, "Deployment", "loraplex")["spec"]["template"]["spec"]["containers"]
    return container


def container_env(objects: list[dict], container: dict) -> dict[str, str]:
    """What the container's process sees: the image's ENV, then envFrom ConfigMaps, then env
    (Secret references resolved with the example Secret's values)."""
    env = dict(dockerfile_env())
    for source in container.get("envFrom", []):
        env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = SECRET["stringData"][ref["key"]]
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_overlay_validates_against_kubernetes_schemas(overlay: str, version: str) -> None:
    objects = render(overlay)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Job",
            "PodDisruptionBudget",
            "Service",
        ]
    )
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_examples_validate_and_are_not_applied_by_default(version: str) -> None:
    for obj in example_objects():
        kubernetes_validate.validate(obj, version, strict=True)
    for overlay in OVERLAYS:
        assert "Secret" not in {o["kind"] for o in render(overlay)}, "a Secret is shipped"
    for folder in ["base", *(f"overlays/{o}" for o in OVERLAYS)]:
        kustomization = KUBERNETES / folder / "kustomization.yaml"
        resources = yaml.safe_load(kustomization.read_text())["resources"]
        assert not any("examples" in r for r in resources), kustomization


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_pods(overlay: str) -> None:
    objects = render(overlay)
    deployment = find(objects, "Deployment", "loraplex")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": find(objects, "Service")["spec"]["selector"],
        "PodDisruptionBudget": find(objects, "PodDisruptionBudget")["spec"]["selector"][
            "matchLabels"
        ],
    }
    for spread in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
        selectors["topologySpread"] = spread["labelSelector"]["matchLabels"]
    for what, selector in selectors.items():
        assert selector and selector.items() <= pod_labels.items(), f"{what} selects {selector}"
    # The migration Job's pods are not server pods: the Service must not route to them.
    job_labels = find(objects, "Job")["spec"]["template"]["metadata"]["labels"]
    assert not selectors["Service"].items() <= job_labels.items()
    target = find(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_answer_on_the_port_the_server_listens_on(
    overlay: str, fake_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(overlay)
    container = server_container(objects)
    settings = settings_from(container_env(objects, container), monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(ports.values()) == [settings.port]
    assert settings.host == "0.0.0.0", "the server must listen beyond the pod's loopback"
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, (
        "engine start takes minutes"
    )
    service = find(objects, "Service")
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports, f"Service targets port {port['targetPort']}"
    server = fake_server()
    for kind, probe in probes.items():
        port = probe["port"]
        assert ports.get(port, port) == settings.port, f"{kind} probes port {port}"
        response = httpx.get(f"{server.url}{probe['path']}")
        assert response.status_code == 200, f"{kind} {probe['path']}: {response.status_code}"


def test_every_loraplex_variable_is_a_setting() -> None:
    """pydantic-settings ignores unknown LORAPLEX_* variables: a misspelt one changes nothing."""
    used: dict[str, set[str]] = {}
    for overlay in OVERLAYS:
        objects = render(overlay)
        for key in find(objects, "ConfigMap")["data"]:
            used.setdefault(key, set()).add(f"{overlay} ConfigMap")
        for where, container in containers(objects):
            for item in container.get("env", []):
                used.setdefault(item["name"], set()).add(f"{overlay} {where}")
    for where, container in containers(example_objects()):
        for item in container.get("env", []):
            used.setdefault(item["name"], set()).add(where)
    for key in dockerfile_env():
        used.setdefault(key, set()).add("Dockerfile")
    unknown = {k: v for k, v in used.items() if k.startswith("LORAPLEX_") and k not in SETTINGS}
    assert not unknown, f"not settings of loraplex (server/settings.py): {unknown}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_parse_and_secrets_resolve(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(overlay)
    secret_keys = set(SECRET["stringData"])
    for where, container in [*containers(objects), *containers(example_objects())]:
        for item in container.get("env", []):
            if "valueFrom" in item:
                ref = item["valueFrom"]["secretKeyRef"]
                assert ref["name"] == SECRET["metadata"]["name"], where
                assert ref["key"] in secret_keys, f"{where}: no key {ref['key']} in the Secret"
        settings = settings_from(container_env(objects, container), monkeypatch)
        assert settings.registry.startswith("postgresql+psycopg://"), where
    settings = settings_from(container_env(objects, server_container(objects)), monkeypatch)
    assert settings.api_keys and settings.admin_key  # the example's JSON list parses
    assert settings.artifacts.startswith("s3://")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_adapter_cache_is_a_per_pod_volume_and_drain_fits_the_grace_period(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(overlay)
    deployment = find(objects, "Deployment", "loraplex")
    spec = deployment["spec"]["template"]["spec"]
    container = server_container(objects)
    settings = settings_from(container_env(objects, container), monkeypatch)
    cache_dir = settings.data_dir() / "cache" / "adapters"  # server.runner.build_resolver
    mounts = {Path(m["mountPath"]): m["name"] for m in container["volumeMounts"]}
    mount = max((p for p in mounts if cache_dir.is_relative_to(p)), key=lambda p: len(p.parts))
    (volume,) = [v for v in spec["volumes"] if v["name"] == mounts[mount]]
    assert "emptyDir" in volume or "ephemeral" in volume, f"{cache_dir} is on {volume}"
    size = volume["emptyDir"]["sizeLimit"]
    assert size.endswith("Gi") and int(size[:-2]) > settings.adapter_cache_gib
    assert deployment["spec"]["replicas"] >= 2
    assert spec["enableServiceLinks"] is False  # else LORAPLEX_PORT=tcp://... from the Service

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = int(pre_stop[1]) + settings.drain_seconds
    assert spec["terminationGracePeriodSeconds"] > needed + 10, "no time left to stop the engine"


def test_images_and_accelerators_per_overlay() -> None:
    for overlay in OVERLAYS:
        objects = render(overlay)
        images = {c["image"] for _, c in containers(objects)}
        assert images == {f"loraplex:{overlay}"}, f"{overlay}: {images}"
        resources = server_container(objects)["resources"]
        gpus = {
            part: resources.get(part, {}).get("nvidia.com/gpu") for part in ("requests", "limits")
        }
        if overlay == "gpu":
            assert gpus == {"requests": "1", "limits": "1"}
            # vLLM shards the model over exactly the GPUs the pod is given.
            env = container_env(objects, server_container(objects))
            assert env["LORAPLEX_TENSOR_PARALLEL_SIZE"] == gpus["limits"]
        else:
            assert gpus == {"requests": None, "limits": None}
        assert resources["requests"]["memory"] and resources["limits"]["memory"]
    train = find(example_objects(), "Job")
    (container,) = train["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "loraplex:gpu"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    dockerfile = (KUBERNETES.parents[1] / "Dockerfile").read_text()
    for overlay in OVERLAYS:
        assert re.search(rf"^FROM \S+ AS {overlay}$", dockerfile, re.M), (
            f"no Dockerfile target {overlay}"
        )


def job_commands() -> dict[str, list[str]]:
    commands = {}
    for overlay in OVERLAYS:
        for where, container in containers(render(overlay)):
            commands[f"{overlay} {where}"] = container.get("args", [])
    for where, container in containers(example_objects()):
        commands[where] = container["args"]
    return commands


def test_pod_commands_parse_with_the_loraplex_cli() -> None:
    """The image's entrypoint is `loraplex`: every container's args are a real subcommand with
    real options (parsed by the CLI's own parser, nothing run)."""
    paths = set()
    for where, args in job_commands().items():
        try:
            path, _ = parse_loraplex_command(args)
        except Exception as e:  # click's usage errors say what is wrong
            raise AssertionError(f"{where}: `loraplex {' '.join(args)}`: {e}") from e
        paths.add(" ".join(path))
    assert {"serve", "registry migrate", "train"} <= paths
    ((_, train),) = containers([find(example_objects(), "Job")])
    _, params = parse_loraplex_command(train["args"])
    assert params["register"], "the training Job must register its adapter"


def test_job_commands_answer_help() -> None:
    """`loraplex SUBCOMMAND --help` exits 0 for every subcommand a pod runs, as a process."""
    loraplex = str(Path(sys.executable).with_name("loraplex"))
    for path in sorted({" ".join(parse_loraplex_command(a)[0]) for a in job_commands().values()}):
        result = subprocess.run(
            [loraplex, *path.split(), "--help"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"loraplex {path} --help: {result.stderr[-500:]}"


def test_autoscaler_metric_is_the_engine_queue_through_prometheus_adapter(fake_server) -> None:
    hpa = find(render("gpu"), "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    wanted = metric["pods"]["metric"]["name"]
    (rule,) = yaml.safe_load((EXAMPLES / "prometheus-adapter-rules.yaml").read_text())["rules"][
        "custom"
    ]
    series = rule["seriesQuery"].split("{")[0]
    renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
    assert renamed == wanted, (
        f"prometheus-adapter serves {series} as {renamed}, the HPA reads {wanted}"
    )
    assert series == "vllm:num_requests_waiting"
    exposition = httpx.get(f"{fake_server().url}/metrics").text
    assert series in exposed_names(exposition), f"{series} is not on /metrics"
