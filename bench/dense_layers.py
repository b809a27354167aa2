"""The model's dense layers alone, through the product vLLM's CPU build picks for them.

A decode step multiplies a few rows by every weight of the model: q/k/v, o, gate/up and down of
each layer, and the LM head. vLLM's CPU build hands each layer to a product it chooses when the
weights load (`dispatch_cpu_unquantized_gemm`: oneDNN's matmul with pre-packed weights, or its
AMX kernel for small bf16 ones). This times that same choice, on the embedded model's shapes,
for `--rows` rows at a time, and sets it against what the memory can deliver (the weights'
bytes over the bandwidth of a plain sum over as many bytes) and against the arithmetic (GFLOP/s).
It says how much of an engine step the dense products take, and whether they are bound by
memory or by the code, per dtype and per code level (`--isa avx2`: the code an AVX2-only CPU
runs, see bench/_isa.py).

    .venv/bin/python bench/dense_layers.py                  # writes bench/results/dense_layers-*.json
    .venv/bin/python bench/dense_layers.py --isa avx2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _isa
from bench._machine import machine_info
from bench._report import write_json
from bench.serving import RESULTS_DIR, default_home, resolve_model, utc_stamp


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", default="1,8,16,32", help="rows per product, comma-separated")
    p.add_argument(
        "--dtypes", default=None,
        help="comma-separated (default: float32, and bfloat16 where the code level has it)",
    )  # fmt: skip
    p.add_argument("--isa", choices=_isa.ISAS, default="native", help="code level (bench/_isa.py)")
    p.add_argument("--repeats", type=int, default=7, help="timed passes; the fastest is kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    p.add_argument("--model", type=Path, default=None, help="HF model folder (default: embedded)")
    p.add_argument("--home", type=Path, default=None, help="loraplex data dir [$LORAPLEX_HOME]")
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def layer_shapes(config: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(name, out, in) of every dense product of a decode step of a Llama-style model, the LM
    head last."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", 0)
    head_dim = config.get("head_dim") or hidden // heads
    per_layer = [
        ("qkv", (heads + 2 * (kv or heads)) * head_dim, hidden),
        ("o", hidden, heads * head_dim),
        ("gate_up", 2 * inter, hidden),
        ("down", hidden, inter),
    ]
    return per_layer * config["num_hidden_layers"] + [("lm_head", config["vocab_size"], hidden)]


def _fastest(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run_worker(config: dict[str, Any]) -> dict[str, Any]:
    _isa.patch_torch(config["isa"])
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    import torch

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    shapes = [tuple(s) for s in config["shapes"]]
    results: dict[str, Any] = {"code": _isa.code_in_use(), "threads": torch.get_num_threads()}
    weight_count = sum(out * inp for _, out, inp in shapes)
    for dtype_name in config["dtypes"]:
        dtype = getattr(torch, dtype_name)
        layers = []
        for _, out, inp in shapes:
            layer = torch.nn.Module()
            layer.weight = torch.nn.Parameter(torch.randn(out, inp).to(dtype), requires_grad=False)
            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)  # what the engine does
            layers.append((layer.cpu_linear, inp))
        chosen = sorted({_product_name(f) for f, _ in layers})
        nbytes = weight_count * torch.empty(0, dtype=dtype).element_size()
        memory = torch.ones(nbytes // 4)  # as many bytes as the weights, summed: the bandwidth
        memory.sum()
        bandwidth = nbytes / _fastest(memory.sum, config["repeats"])
        del memory
        per_rows = {}
        for rows in config["rows"]:
            inputs = {n: torch.randn(rows, n).to(dtype) for n in {inp for _, inp in layers}}

            def step(inputs: dict[int, Any] = inputs, layers: list = layers) -> None:
                for product, inp in layers:
                    product(inputs[inp], None, None)

            step()
            seconds = _fastest(step, config["repeats"])
            head_product, head_in = layers[-1]
            head = _fastest(lambda: head_product(inputs[head_in], None, None), 3)  # noqa: B023
            per_rows[str(rows)] = {
                "ms": round(seconds * 1e3, 2),
                "ms_without_lm_head": round((seconds - head) * 1e3, 2),
                "gb_per_s": round(nbytes / seconds / 1e9, 1),
                "gflop_per_s": round(2 * rows * weight_count / seconds / 1e9, 1),
                "memory_bound_ms": round(nbytes / bandwidth * 1e3, 2),
            }
            print(f"  {dtype_name:9} rows {rows:3}: {per_rows[str(rows)]}", flush=True)
        results[dtype_name] = {
            "products": chosen, "weight_bytes": nbytes,
            "sum_bandwidth_gb_per_s": round(bandwidth / 1e9, 1), "rows": per_rows,
        }  # fmt: skip
    return results


def _product_name(product: Any) -> str:
    """Which product vLLM chose for a layer, from the names its callable uses."""
    names = set(getattr(getattr(product, "__code__", None), "co_names", ()))
    for known in ("onednn_mm", "weight_packed_linear_cpu", "zentorch_linear_unary", "linear"):
        if known in names:
            return known
    return getattr(product, "__name__", "unknown")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        config = json.loads(args.worker.read_text())
        (args.worker.parent / "result.json").write_text(json.dumps(run_worker(config)))
        return 0
    model = resolve_model(args.model, (args.home or default_home()).expanduser())
    model_config = json.loads((model / "config.json").read_text())
    native_bf16 = _isa.emulated_cpu(args.isa).native_bf16
    dtypes = args.dtypes.split(",") if args.dtypes else (
        ["float32", "bfloat16"] if native_bf16 else ["float32"])  # fmt: skip
    config = {
        "isa": args.isa, "dtypes": dtypes, "rows": [int(r) for r in args.rows.split(",")],
        "repeats": args.repeats, "threads": args.threads, "shapes": layer_shapes(model_config),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config))
        env = os.environ | _isa.environment(args.isa)
        subprocess.run([sys.executable, __file__, "--worker", str(path)], check=True, env=env)
        result = json.loads((Path(tmp) / "result.json").read_text())
    print("code in use:", json.dumps(result["code"]))
    for dtype in dtypes:
        r = result[dtype]
        print(f"{dtype}: {r['products']}, {r['weight_bytes'] / 1e6:.0f} MB of weights, "
              f"sum bandwidth {r['sum_bandwidth_gb_per_s']} GB/s")  # fmt: skip
        for rows, f in r["rows"].items():
            print(f"  rows {rows:>3}: {f['ms']:7.2f} ms a step (memory bound "
                  f"{f['memory_bound_ms']:.2f}), {f['gflop_per_s']} GFLOP/s")  # fmt: skip
    out = args.out or RESULTS_DIR / f"dense_layers-{utc_stamp()}.json"
    write_json(out, {
        "benchmark": "dense_layers", "machine": machine_info(dtypes[0]),
        "settings": {k: v for k, v in config.items() if k != "shapes"} | {
            "model": str(model), "products_per_step": len(config["shapes"]),
        },
        "results": result,
    })  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
