"""Validation of a PEFT LoRA adapter folder before anything serves or registers it.

Every problem is collected and reported at once, and every malformed input ends as a listed
problem, never as an exception; nothing here loads weights (only the safetensors header is
read). Given the base model it will be served on (registry.base_model), module names, layer
indices and in/out features are checked against that model's own config. Used by the server
for local adapters and by the registry at register time, so that nothing the engine would
reject, or that could harm it, gets that far.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.base_model import BaseModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
# Layers no LoRA this server loads may replace, whatever the base: checked when the base
# model's own module list is unknown.
NEVER_SERVED_MODULES = frozenset({"lm_head", "embed_tokens"})
_ITEM_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_LORA_TENSOR = re.compile(
    r"\.(?P<module>[A-Za-z0-9_]+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$"
)
_LAYER = re.compile(r"\.layers\.(?P<layer>\d+)\.")


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


@dataclass(frozen=True, slots=True)
class _Header:
    tensors: dict[str, Any]
    data_bytes: int  # bytes after the header: where data_offsets must point


def validate_adapter_dir(
    path: Path, *, max_rank: int, max_bytes: int = 2 * 1024**3, base: BaseModel | None = None
) -> ValidationReport:
    """Check a LoRA adapter folder; the report lists every problem found (empty when valid).

    With `base`, tensors must fit that model's linear layers; without, only the adapter's own
    consistency (and NEVER_SERVED_MODULES) is checked.
    """
    report = ValidationReport()
    if not path.is_dir():
        report.problems.append(f"{path} is not a folder")
        return report
    if base is not None and base.problem:
        report.problems.append(base.problem)
    _check_files(path, report, max_bytes=max_bytes)
    config = _read_config(path / ADAPTER_CONFIG, report)
    header = _read_safetensors_header(path / ADAPTER_WEIGHTS, report)
    if config is None:
        return report
    rank, alpha = _check_config(config, report, max_rank=max_rank)
    modules = _check_tensors(header, rank, report, base=base) if header and rank else ()
    if report.ok:
        declared = config.get("base_model_name_or_path")
        report.manifest = AdapterManifest(
            rank=rank,
            alpha=alpha,
            target_modules=modules,
            base_model=declared if isinstance(declared, str) else None,
            size_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        )
    return report


def _check_files(path: Path, report: ValidationReport, *, max_bytes: int) -> None:
    root = path.resolve()
    total = 0
    try:
        for entry in sorted(path.rglob("*")):
            if entry.is_symlink():
                report.problems.append(
                    f"{entry.relative_to(path)} is a symbolic link (not allowed)"
                )
            elif not entry.resolve().is_relative_to(root):
                report.problems.append(f"{entry.relative_to(path)} points outside the adapter")
            elif entry.is_file():
                total += entry.stat().st_size
    except OSError as e:
        report.problems.append(f"the adapter folder cannot be read: {e}")
    if total > max_bytes:
        report.problems.append(f"adapter is {total} bytes, above the limit of {max_bytes}")
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / required).is_file():
            report.problems.append(f"missing {required}")


def _read_config(path: Path, report: ValidationReport) -> dict | None:
    if not path.is_file() or path.is_symlink():
        return None
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
        config = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        report.problems.append(f"{ADAPTER_CONFIG} is not valid JSON (UTF-8): {_short(e)}")
        return None
    if not isinstance(config, dict):
        report.problems.append(f"{ADAPTER_CONFIG} must hold a JSON object")
        return None
    return config


def _check_config(config: dict, report: ValidationReport, *, max_rank: int) -> tuple[int, float]:
    """(rank, alpha); rank 0 when the rank is unusable."""
    problems = report.problems
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {_show(config.get('peft_type'))}; only 'LORA' is served")
    if config.get("use_dora"):
        problems.append("DoRA adapters (use_dora=true) are not supported by the engine")
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save={_show(config['modules_to_save'])} is not supported: the adapter "
            "would replace whole base-model layers"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern (per-layer ranks) are not supported")
    targets = config.get("target_modules")
    if targets is not None and not _is_str_or_str_list(targets):
        problems.append(
            f"target_modules must be a string or a list of strings, got {_show(targets)}"
        )
    rank = config.get("r")
    if not _is_int(rank) or rank < 1:
        problems.append(f"r must be a positive integer, got {_show(rank)}")
        rank = 0
    elif rank > max_rank:
        problems.append(f"rank {rank} is above the server's limit of {max_rank}")
    alpha = config.get("lora_alpha")
    if alpha is None:
        alpha = rank  # PEFT's scaling is alpha / r: no alpha means a scale of 1
    elif not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        problems.append(f"lora_alpha must be a positive number, got {_show(alpha)}")
        alpha = rank
    return rank, float(alpha)


def _read_safetensors_header(path: Path, report: ValidationReport) -> _Header | None:
    if not path.is_file() or path.is_symlink():
        return None
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"the file is {size} bytes, shorter than a header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or length + 8 > size:
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(f.read(length).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        report.problems.append(f"{ADAPTER_WEIGHTS} is not a readable safetensors file: {_short(e)}")
        return None
    if not isinstance(header, dict):
        report.problems.append(f"{ADAPTER_WEIGHTS}'s header is JSON but not an object")
        return None
    header.pop("__metadata__", None)
    return _Header(tensors=header, data_bytes=size - 8 - length)


def _check_tensors(
    header: _Header, rank: int, report: ValidationReport, *, base: BaseModel | None
) -> tuple[str, ...]:
    modules: set[str] = set()
    halves: dict[str, set[str]] = {}
    for name, info in header.tensors.items():
        match = _LORA_TENSOR.search(name)
        if match is None:
            report.problems.append(f"tensor {name!r} is not a LoRA A/B weight")
            continue
        module, ab = match["module"], match["ab"]
        modules.add(module)
        halves.setdefault(name[: match.start("ab") - len("lora_")], set()).add(ab)
        shape = _check_entry(name, info, header.data_bytes, report)
        if shape is not None:
            _check_shape(name, module, ab, shape, rank, report, base=base)
    if not header.tensors:
        report.problems.append(f"{ADAPTER_WEIGHTS} holds no tensors")
    for prefix, seen in sorted(halves.items()):
        if seen != {"A", "B"}:
            missing = "lora_B" if "A" in seen else "lora_A"
            report.problems.append(f"{prefix.rstrip('.')} has no {missing} weight")
    _check_module_names(modules, report, base=base)
    return tuple(sorted(modules))


def _check_entry(name: str, info: Any, data_bytes: int, report: ValidationReport) -> list | None:
    """The tensor's 2-D shape if its header entry is well formed and its bytes are in the file."""
    if not isinstance(info, dict):
        report.problems.append(f"tensor {name!r} has a malformed header entry {_show(info)}")
        return None
    shape, dtype, offsets = info.get("shape"), info.get("dtype"), info.get("data_offsets")
    if not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(d) for d in shape):
        report.problems.append(f"tensor {name!r} has shape {_show(shape)}; expected 2 dimensions")
        return None
    if dtype not in _ITEM_BYTES:
        report.problems.append(
            f"tensor {name!r} has dtype {_show(dtype)}; expected one of {sorted(_ITEM_BYTES)}"
        )
        return shape
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data_bytes
        and offsets[1] - offsets[0] == shape[0] * shape[1] * _ITEM_BYTES[dtype]
    ):
        report.problems.append(
            f"tensor {name!r} has data_offsets {_show(offsets)} that do not hold a {dtype} "
            f"{shape} tensor within the file's {data_bytes} data bytes"
        )
    return shape


def _check_shape(
    name: str,
    module: str,
    ab: str,
    shape: list[int],
    rank: int,
    report: ValidationReport,
    *,
    base: BaseModel | None,
) -> None:
    if (ab == "A" and shape[0] != rank) or (ab == "B" and shape[1] != rank):
        report.problems.append(f"tensor {name!r} has shape {shape} inconsistent with r={rank}")
        return
    if base is None:
        return
    layer = _LAYER.search(name)
    if base.num_layers is not None and layer and int(layer["layer"]) >= base.num_layers:
        report.problems.append(
            f"tensor {name!r} is for layer {layer['layer']} but the base model has "
            f"{base.num_layers} layers"
        )
    if base.modules is None or module not in base.modules:
        return
    in_features, out_features = base.modules[module]
    expected = [rank, in_features] if ab == "A" else [out_features, rank]
    if shape != expected:
        report.problems.append(
            f"tensor {name!r} has shape {shape}; the base model's {module} "
            f"({in_features} -> {out_features}) needs {expected}"
        )


def _check_module_names(modules: set[str], report: ValidationReport, *, base: BaseModel | None):
    known = base.modules if base is not None else None
    if known is None:
        unsupported = sorted(modules & NEVER_SERVED_MODULES)
        if unsupported:
            report.problems.append(
                f"target modules {unsupported} are not supported: only attention and MLP "
                "linear layers are served"
            )
        return
    unsupported = sorted(modules - set(known))
    if unsupported:
        report.problems.append(
            f"target modules {unsupported} are not linear layers of the base model "
            f"({base.model_type}); it has {sorted(known)}"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_str_or_str_list(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )


def _show(value: Any) -> str:
    """repr() bounded, so a crafted config cannot make the report itself huge."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
