"""Validation of a PEFT LoRA adapter folder before anything serves or registers it.

Every problem is collected and reported at once; nothing here loads weights (only the
safetensors header is read). Used by the server for local adapters and by the registry at
register time, so that nothing the engine would reject, or that could harm it, gets that far.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Linear layers of Llama-family attention and MLP blocks that vLLM's LoRA layers cover.
SUPPORTED_TARGET_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
)
MAX_HEADER_BYTES = 16 * 1024 * 1024
_LORA_TENSOR = re.compile(
    r"\.(?P<module>[A-Za-z0-9_]+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$"
)


@dataclass(frozen=True, slots=True)
class AdapterManifest:
    """What the adapter says about itself, read from its config and weight header."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str | None
    size_bytes: int


@dataclass(slots=True)
class ValidationReport:
    problems: list[str] = field(default_factory=list)
    manifest: AdapterManifest | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_adapter_dir(
    path: Path, *, max_rank: int, max_bytes: int = 2 * 1024**3
) -> ValidationReport:
    """Check a LoRA adapter folder; the report lists every problem found (empty when valid)."""
    report = ValidationReport()
    if not path.is_dir():
        report.problems.append(f"{path} is not a folder")
        return report
    _check_files(path, report, max_bytes=max_bytes)
    config = _read_config(path / ADAPTER_CONFIG, report)
    tensors = _read_safetensors_header(path / ADAPTER_WEIGHTS, report)
    if config is None:
        return report
    rank = _check_config(config, report, max_rank=max_rank)
    modules = _check_tensors(tensors, rank, report) if tensors is not None and rank else ()
    if report.ok:
        report.manifest = AdapterManifest(
            rank=rank,
            alpha=float(config.get("lora_alpha") or rank),
            target_modules=modules,
            base_model=config.get("base_model_name_or_path"),
            size_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        )
    return report


def _check_files(path: Path, report: ValidationReport, *, max_bytes: int) -> None:
    root = path.resolve()
    total = 0
    for entry in sorted(path.rglob("*")):
        if entry.is_symlink():
            report.problems.append(f"{entry.relative_to(path)} is a symbolic link (not allowed)")
        elif not entry.resolve().is_relative_to(root):
            report.problems.append(f"{entry.relative_to(path)} points outside the adapter folder")
        elif entry.is_file():
            total += entry.stat().st_size
    if total > max_bytes:
        report.problems.append(f"adapter is {total} bytes, above the limit of {max_bytes}")
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / required).is_file():
            report.problems.append(f"missing {required}")


def _read_config(path: Path, report: ValidationReport) -> dict | None:
    if not path.is_file() or path.is_symlink():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        report.problems.append(f"{ADAPTER_CONFIG} is not valid JSON: {e}")
        return None
    if not isinstance(config, dict):
        report.problems.append(f"{ADAPTER_CONFIG} must hold a JSON object")
        return None
    return config


def _check_config(config: dict, report: ValidationReport, *, max_rank: int) -> int:
    if config.get("peft_type") != "LORA":
        report.problems.append(f"peft_type is {config.get('peft_type')!r}; only 'LORA' is served")
    if config.get("use_dora"):
        report.problems.append("DoRA adapters (use_dora=true) are not supported by the engine")
    if config.get("modules_to_save"):
        report.problems.append(
            f"modules_to_save={config['modules_to_save']!r} is not supported: the adapter would "
            "replace whole base-model layers"
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        report.problems.append(f"r must be a positive integer, got {rank!r}")
        return 0
    if rank > max_rank:
        report.problems.append(f"rank {rank} is above the server's limit of {max_rank}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        report.problems.append("rank_pattern/alpha_pattern (per-layer ranks) are not supported")
    return rank


def _read_safetensors_header(path: Path, report: ValidationReport) -> dict | None:
    if not path.is_file() or path.is_symlink():
        return None
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES or length + 8 > size:
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as e:
        report.problems.append(f"{ADAPTER_WEIGHTS} is not a readable safetensors file: {e}")
        return None
    header.pop("__metadata__", None)
    return header


def _check_tensors(tensors: dict, rank: int, report: ValidationReport) -> tuple[str, ...]:
    modules: set[str] = set()
    for name, info in tensors.items():
        match = _LORA_TENSOR.search(name)
        if match is None:
            report.problems.append(f"tensor {name!r} is not a LoRA A/B weight")
            continue
        module, ab = match["module"], match["ab"]
        modules.add(module)
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or len(shape) != 2:
            report.problems.append(f"tensor {name!r} has shape {shape!r}; expected 2 dimensions")
        elif (ab == "A" and shape[0] != rank) or (ab == "B" and shape[1] != rank):
            report.problems.append(f"tensor {name!r} has shape {shape} inconsistent with r={rank}")
    if not tensors:
        report.problems.append(f"{ADAPTER_WEIGHTS} holds no tensors")
    unsupported = sorted(modules - SUPPORTED_TARGET_MODULES)
    if unsupported:
        report.problems.append(
            f"target modules {unsupported} are not supported; supported: "
            f"{sorted(SUPPORTED_TARGET_MODULES)}"
        )
    return tuple(sorted(modules))
