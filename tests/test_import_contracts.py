"""Import contracts of DESIGN.md, checked on the source: every `import` statement counts, the ones
inside functions too (a lazy import of vLLM from the registry is still a dependency on it).

- `registry` imports nothing of `server`, `loadtest`, `trainer` or `bench`, and no FastAPI or torch.
- `loadtest` imports no package of ours (it speaks HTTP only).
- `trainer` imports `registry` (and the root's dtype choice), never `server` (it speaks HTTP to one).
- `loraplex` (the root) mounts the CLIs; apart from that it imports nothing heavy.
- vLLM only in the engine module and the plugin modules vLLM loads in its own processes;
  torch / transformers / peft / trl only there, in the one-time model conversion and in `trainer`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"loraplex", "server", "registry", "loadtest", "trainer", "bench"}
HEAVY = {"torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"}

# Modules allowed to import vLLM (the engine, the plugin vLLM loads, the ops that plugin installs).
VLLM_MODULES = {"server/engine_vllm.py", "server/vllm_patches.py", "server/lora_cpu_ops.py"}
# Modules allowed to import torch & co. besides those: the one-time model conversion, the probe,
# and the CPU LoRA kernel's loader (it runs in the same engine processes as the ops).
TORCH_MODULES = VLLM_MODULES | {
    "server/embedded_model.py",
    "loraplex/hardware.py",
    "server/lora_kernel.py",
}


def imports_of(path: Path) -> set[str]:
    """Top-level package names of every import in the file (absolute imports only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def violations(package: str, forbidden: set[str], *, allowed: set[str] = frozenset()) -> list[str]:
    found = []
    for path in package_files(package):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed:
            continue
        bad = imports_of(path) & forbidden
        found.extend(f"{rel} imports {name}" for name in sorted(bad))
    return found


def test_imports_of_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "import json\n\ndef f():\n    from vllm.lora import request\n    import torch.nn\n"
    )
    assert imports_of(source) == {"json", "vllm", "torch"}


def test_registry_depends_on_no_server_and_nothing_heavy() -> None:
    forbidden = (OURS - {"registry"}) | HEAVY | {"vllm", "fastapi", "starlette", "uvicorn"}
    assert violations("registry", forbidden) == []


def test_trainer_depends_on_the_registry_only() -> None:
    """The trainer talks to a server (the agreement gate, evaluation) over HTTP only."""
    forbidden = (OURS - {"trainer", "registry", "loraplex"}) | {"vllm", "fastapi", "uvicorn"}
    assert violations("trainer", forbidden) == []


def test_loadtest_imports_no_package_of_ours() -> None:
    assert violations("loadtest", (OURS - {"loadtest"}) | HEAVY | {"vllm"}) == []


@pytest.mark.parametrize("package", ["server", "registry", "loadtest", "loraplex"])
def test_vllm_only_in_the_engine_modules(package: str) -> None:
    assert violations(package, {"vllm"}, allowed=VLLM_MODULES) == []


@pytest.mark.parametrize("package", ["server", "registry", "loadtest", "loraplex"])
def test_torch_only_where_design_allows(package: str) -> None:
    assert violations(package, HEAVY, allowed=TORCH_MODULES) == []


def test_server_does_not_import_loadtest_or_bench() -> None:
    assert violations("server", {"loadtest", "bench", "trainer"}) == []
