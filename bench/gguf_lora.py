"""PEFT LoRA adapter folder -> GGUF LoRA file, for llama.cpp next to a llama-architecture GGUF base.

    .venv/bin/python bench/gguf_lora.py ADAPTER_DIR BASE.gguf OUT.gguf

The file is what llama.cpp's adapter loader reads: `general.type` "adapter", `general.architecture`
the base's, `adapter.type` "lora", `adapter.lora.alpha`, and per adapted weight `W` of the base
two tensors `W.lora_a` and `W.lora_b` (e.g. `blk.3.attn_q.weight.lora_a`). llama.cpp checks
`lora_a.ne = [in, rank]` and `lora_b.ne = [rank, out]` against the base weight's `ne = [in, out]`
(ggml's `ne` lists dimensions innermost first), so in numpy order A is (rank, in) and B is
(out, rank): PEFT's own layouts, written untransposed. It adds `scale * alpha / rank * B @ A`,
PEFT's scaling for a plain LoRA; an rsLoRA adapter (alpha / sqrt(rank)) is written with alpha
multiplied by sqrt(rank) so the product is the same.

The query and key projections of a llama GGUF hold their output rows in another order than the
Hugging Face weights: llama.cpp rotates adjacent pairs (row 2i with 2i+1 within a head) where
Hugging Face rotates the two halves of a head (row i with i + head_dim/2). The GGUF's row 2i + s of
a head is the Hugging Face row s * head_dim/2 + i, so B of `q_proj` / `k_proj` (whose rows are
output rows) is reordered the same way; A (input side) is not.

Every problem of the folder (unknown modules, DoRA, per-module ranks, shapes that do not fit the
base) is reported at once, and nothing is written unless the whole adapter converts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Hugging Face module name -> llama.cpp's tensor name inside block N (gguf.TENSOR_NAMES for llama).
MODULE_TENSORS: dict[str, str] = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
ROPE_PERMUTED = {"q_proj": "head_count", "k_proj": "head_count_kv"}
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\."
    r"(?P<module>\w+)\.lora_(?P<side>[AB])\.weight$"
)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class ConversionError(Exception):
    """The adapter cannot be written as a GGUF LoRA for this base (every reason, at once)."""


@dataclass(frozen=True, slots=True)
class BaseInfo:
    """What the conversion needs from the base GGUF."""

    architecture: str
    head_count: int
    head_count_kv: int
    shapes: dict[str, tuple[int, int]]  # tensor name -> numpy shape (out, in)

    @classmethod
    def read(cls, path: Path) -> BaseInfo:
        from gguf import GGUFReader

        reader = GGUFReader(path)

        def field(key: str) -> object:
            found = reader.get_field(key)
            if found is None:
                raise ConversionError(f"{path.name}: no {key} in the base GGUF")
            return found.contents()

        arch = str(field("general.architecture"))
        shapes = {
            t.name: (int(t.shape[1]), int(t.shape[0])) for t in reader.tensors if len(t.shape) == 2
        }
        return cls(
            architecture=arch,
            head_count=int(field(f"{arch}.attention.head_count")),  # type: ignore[call-overload]
            head_count_kv=int(field(f"{arch}.attention.head_count_kv")),  # type: ignore[call-overload]
            shapes=shapes,
        )


def rope_rows_to_gguf(rows: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the output rows of a q/k weight (or LoRA B) from Hugging Face's order to the GGUF's:
    in each head, row s * head_dim/2 + i moves to row 2i + s."""
    out = rows.shape[0]
    if out % heads or (out // heads) % 2:
        raise ConversionError(f"{out} rows do not split into {heads} heads of an even size")
    half = out // heads // 2
    return rows.reshape(heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _config_problems(config: dict[str, object]) -> list[str]:
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, only LORA converts")
    if config.get("use_dora"):
        problems.append("DoRA adapters (use_dora) have no GGUF LoRA form")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key} is set: a GGUF LoRA has one rank and one alpha")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out adapters (Conv1D layouts) are not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append(f"bias={config.get('bias')!r}: LoRA biases are not supported")
    if config.get("modules_to_save"):
        problems.append("modules_to_save (fully trained modules) cannot be written as LoRA")
    if not isinstance(config.get("r"), int) or not isinstance(
        config.get("lora_alpha"), int | float
    ):
        problems.append("adapter_config.json needs an integer r and a numeric lora_alpha")
    return problems


def _load_weights(path: Path) -> dict[str, np.ndarray]:
    import torch
    from safetensors.torch import load_file

    return {k: v.to(torch.float32).numpy() for k, v in load_file(path).items()}


def plan(adapter_dir: Path, base: BaseInfo) -> tuple[float, dict[str, np.ndarray]]:
    """The alpha and the GGUF tensors (name -> float32 array, numpy order) of an adapter folder."""
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:
        raise ConversionError(f"{adapter_dir}: missing {', '.join(missing)}")
    config = json.loads(config_path.read_text())
    problems = _config_problems(config)
    if base.architecture != "llama":
        problems.append(f"base architecture {base.architecture!r}: only llama is mapped")
    if problems:
        raise ConversionError(f"{adapter_dir}: " + "; ".join(problems))
    rank = int(config["r"])
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha/sqrt(r); llama.cpp by alpha/r
    tensors: dict[str, np.ndarray] = {}
    for key, value in sorted(_load_weights(weights_path).items()):
        match = _KEY.match(key)
        if match is None or match["module"] not in MODULE_TENSORS:
            problems.append(f"{key}: not a LoRA weight of a mapped llama module")
            continue
        module, side = match["module"], match["side"]
        weight = f"blk.{match['layer']}.{MODULE_TENSORS[module]}.weight"
        if weight not in base.shapes:
            problems.append(f"{key}: the base has no tensor {weight}")
            continue
        out, inp = base.shapes[weight]
        expected = (rank, inp) if side == "A" else (out, rank)
        if value.shape != expected:
            problems.append(f"{key}: shape {value.shape}, expected {expected} (r={rank})")
            continue
        if side == "B" and module in ROPE_PERMUTED:
            heads = getattr(base, ROPE_PERMUTED[module])
            value = rope_rows_to_gguf(value, heads)
        tensors[f"{weight}.lora_{side.lower()}"] = np.ascontiguousarray(value, dtype=np.float32)
    pairs = {name.rsplit(".", 1)[0] for name in tensors}
    for weight in sorted(pairs):
        for side in ("lora_a", "lora_b"):
            if f"{weight}.{side}" not in tensors:
                problems.append(f"{weight}: {side} missing")
    if not tensors and not problems:
        problems.append("no LoRA weights in the adapter")
    if problems:
        raise ConversionError(f"{adapter_dir}: " + "; ".join(problems))
    return alpha, tensors


def convert(adapter_dir: Path, base_gguf: Path, out_path: Path) -> Path:
    """Write the GGUF LoRA of `adapter_dir` for `base_gguf` to `out_path` (atomically)."""
    from gguf import GGUFType, GGUFWriter, Keys

    base = BaseInfo.read(base_gguf)
    alpha, tensors = plan(adapter_dir, base)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(tmp, base.architecture)
        writer.add_type(GGUFType.ADAPTER)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(adapter_dir.name)
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("adapter_dir", type=Path, help="PEFT LoRA folder")
    p.add_argument("base_gguf", type=Path, help="the base model's GGUF (llama architecture)")
    p.add_argument("out", type=Path, help="GGUF LoRA file to write")
    args = p.parse_args(argv)
    try:
        convert(args.adapter_dir, args.base_gguf, args.out)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
