"""Multi-LoRA throughput of the CPU engine, vLLM's LoRA ops against loraplex's, with a profile.

One vLLM engine per run, in this process's child (engine core in-process, no HTTP: the figures
isolate the model's LoRA path; VLLM_ENABLE_V1_MULTIPROCESSING=1 runs the engine core and the
model worker in processes of their own, as `loraplex serve` does), with LoRA ops:

  vllm       vLLM's own torch ops (which also serve base rows of a mixed batch wrongly)
  segmented  loraplex's per-op replacements in the linear layers (one matmul per adapter
             present, per op; the isolation fix alone), LM head and embedding as loraplex
  loraplex   what `loraplex serve` runs: fused per-layer products (linear layers, LM head),
             layers no adapter of the batch targets skipped, per-op replacements elsewhere;
             decode-sized batches in one call of the C kernel per layer (server/lora_kernel.c)
  loraplex-eager
             the same with the model run eagerly (LORAPLEX_COMPILE=0), as vLLM's CPU platform
             runs it whenever LoRA is on: what compiling the model gains
  loraplex-torch
             the same with the kernel off (LORAPLEX_LORA_KERNEL=0): decode-sized batches in
             torch, fp32 (what runs where no C compiler is there)
  loraplex-model-dtype
             kernel off and every batch in the model's dtype (LORAPLEX_LORA_FP32_ROWS=0): what
             the fp32 path for decode-sized batches gains

Runs cycle through them `--rounds` times, the order reversed every other round, so that drift
on the machine hits all alike. Within a run, `--repeats` cycles through the scenarios; the
paired ratios (one/base, mixedN/one of the same cycle, runs seconds apart) move less with the
machine's drift than ratios of medians.

Scenarios: `--requests` chat requests, `--concurrency` decoded at once (max_num_seqs; the rest
queue, as a closed loop would), greedy, exactly `--max-tokens` output tokens each (ignore_eos):
base model only, one adapter, 4 adapters and 8 adapters round-robin. The engine has 8 LoRA
slots (max_loras 8) in every scenario, so the scenarios differ only in their traffic. The engine
computes in the dtype `loraplex serve` chooses for this CPU (`--dtype` to override).

Profile, per scenario, in ms per engine step: `step` (EngineCore.step: scheduling + model),
`forward` (worker execute_model) and `sample` (sample_tokens), and within the forward the LoRA
parts vLLM's punica wrapper computes: `lora_linear` (every LoRA-wrapped linear layer),
`lora_logits` (LM head), `lora_embedding`, `lora_metadata` (per-step slot layout); with
`--profile-kernel`, `lora_kernel` (the C kernel's calls, inside `lora_linear`).

Agreement: per scenario, untimed, the top-5 log-probs of the first tokens of 32 greedy requests;
each ops after the first is compared with the first (`agreement` in the results: the largest and
median difference, and how many requests chose the same tokens). `--ops loraplex-eager,loraplex
--dtype float32` checks that the compiled model computes what the eager one does.

`--isa avx2` runs the code an AVX2-only CPU runs, in fp32, on this CPU (bench/_isa.py says what
is switched and what is not reproduced); each run records the code it used (`code`).

    .venv/bin/python bench/lora_cpu.py                  # writes bench/results/lora_cpu-*.json
    .venv/bin/python bench/lora_cpu.py --rounds 1 --requests 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _isa
from bench._adapters import ALL_ADAPTER_NAMES, ensure_adapters
from bench._machine import machine_info, sample_foreign_cpu
from bench._report import write_json
from bench._workload import PROMPTS
from bench.serving import (
    RESULTS_DIR,
    add_dtype_option,
    add_model_options,
    default_home,
    resolve_model,
    utc_stamp,
)
from loraplex.hardware import choose_dtype

OPS = ("vllm", "segmented", "loraplex", "loraplex-eager", "loraplex-torch", "loraplex-model-dtype")
SCENARIOS: dict[str, tuple[str | None, ...]] = {
    "base": (None,),
    "one": ALL_ADAPTER_NAMES[:1],
    "mixed4": ALL_ADAPTER_NAMES[:4],
    "mixed8": ALL_ADAPTER_NAMES[:8],
}
MAX_LORAS = len(ALL_ADAPTER_NAMES)
AGREEMENT_REQUESTS, AGREEMENT_TOKENS = 32, 4  # what `top_logprobs` records per scenario


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=32, help="requests per scenario")
    p.add_argument("--concurrency", type=int, default=8, help="sequences decoded at once")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--rounds", type=int, default=2, help="runs per ops, alternating")
    p.add_argument(
        "--repeats", type=int, default=1,
        help="cycles through the scenarios within each run (paired ratios per cycle)",
    )  # fmt: skip
    p.add_argument("--ops", default="vllm,loraplex", help=f"comma-separated subset of {OPS}")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    p.add_argument("--max-lora-rank", type=int, default=16, help="engine's max_lora_rank")
    p.add_argument(
        "--profile-kernel", action="store_true",
        help="also time the C kernel's calls (`lora_kernel` in the profile); the timer adds a "
        "few us to each, so the ratios of such a run read low",
    )  # fmt: skip
    p.add_argument(
        "--isa", choices=_isa.ISAS, default="native",
        help="avx2: run the code an AVX2-only CPU runs (torch, oneDNN, vLLM's C++ ops, the "
        "LoRA kernel; fp32 under --dtype auto) on this CPU (bench/_isa.py)",
    )  # fmt: skip
    add_dtype_option(p)
    add_model_options(p, work_dir_help="bench adapters")
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p


# -- the worker: one engine, every scenario -------------------------------------------------------


class Profile:
    """Seconds spent in a few engine functions, by wrapping them (a few µs per call)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        setattr(owner, name, self.timed(getattr(owner, name), label))

    def timed(self, original: Any, label: str) -> Any:
        seconds, calls = self.seconds, self.calls

        import torch

        def timed(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():  # traced into the model's graph: time nothing
                return original(*args, **kwargs)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - started
                calls[label] += 1

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def _install_profile() -> Profile:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.gpu_worker import Worker

    from server import vllm_patches

    profile = Profile()
    # Wrapped after loraplex's patches (vLLM loads its plugins before the engine is built, and
    # LLM() below builds it), so the timers see whichever implementation is installed.
    profile.wrap(EngineCore, "step", "step")
    profile.wrap(Worker, "execute_model", "forward")
    profile.wrap(Worker, "sample_tokens", "sample")
    profile.wrap(PunicaWrapperCPU, "add_lora_linear", "lora_linear")  # eager model run
    profile.wrap(vllm_patches, "_run_layer", "lora_linear")  # compiled: loraplex::lora_layer
    profile.wrap(PunicaWrapperCPU, "update_metadata", "lora_metadata")
    profile.wrap(PunicaWrapperCPU, "add_lora_logits", "lora_logits")
    profile.wrap(PunicaWrapperCPU, "add_lora_embedding", "lora_embedding")
    return profile


def _fallback_calls() -> int:
    from server import vllm_patches

    return vllm_patches.fallback_calls


def measure_scenario(
    llm: Any, profile: Profile, batch: Any, scenario: str, params: Any, config: dict[str, Any],
    repeat: int,
) -> dict[str, Any]:  # fmt: skip
    """One timed run of `scenario` (after a short warm-up of its adapters)."""
    from vllm import SamplingParams

    models = SCENARIOS[scenario]
    warm_prompts, warm_loras = batch(models, max(len(models), 4))
    llm.generate(warm_prompts, SamplingParams(max_tokens=4), lora_request=warm_loras,
                 use_tqdm=False)  # fmt: skip
    texts, loras = batch(models, config["requests"])
    foreign_before = sample_foreign_cpu(1.0).foreign_cpu_cores
    profile.reset()
    started = time.perf_counter()
    outputs = llm.generate(texts, params, lora_request=loras, use_tqdm=False)
    wall = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    steps = max(profile.calls["step"], 1)
    result = {
        "output_tokens": tokens,
        "seconds": round(wall, 3),
        "output_tokens_per_second": round(tokens / wall, 1),
        "steps": profile.calls["step"],
        "ms_per_step": {k: round(v * 1000 / steps, 2) for k, v in profile.seconds.items()},
        "lora_linear_calls_per_step": round(profile.calls["lora_linear"] / steps, 1),
        "fused_fallback_calls": _fallback_calls(),
        "foreign_cpu_cores_before": foreign_before,
        "first_output": outputs[0].outputs[0].text[:80],
    }
    print(f"  {config['ops']:>8} {scenario:<7} #{repeat + 1} {result['output_tokens_per_second']:>7}"
          f" tok/s  {result['ms_per_step']}", flush=True)  # fmt: skip
    if repeat == 0:
        result["top_logprobs"] = top_logprobs(llm, texts, loras)
    return result


def top_logprobs(llm: Any, texts: list[str], loras: list[Any]) -> list[list[dict[str, float]]]:
    """Greedy, untimed: per request (at most AGREEMENT_REQUESTS of them, in the scenario's mix),
    per token of the first AGREEMENT_TOKENS, the top-5 log-probs by token id: what `agreement`
    compares between ops."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=AGREEMENT_TOKENS, logprobs=5)
    count = min(len(texts), AGREEMENT_REQUESTS)
    outputs = llm.generate(texts[:count], params, lora_request=loras[:count], use_tqdm=False)
    return [
        [{str(t): lp.logprob for t, lp in position.items()} for position in o.outputs[0].logprobs]
        for o in outputs
    ]


def agreement(reference: list[list[dict[str, float]]], other: list[list[dict[str, float]]]
              ) -> dict[str, Any]:  # fmt: skip
    """How far one ops' top-5 log-probs are from the reference ops' on the same requests: over
    the tokens of every position up to where the greedy choices first differ, the largest and
    the median absolute difference; and the share of requests whose greedy tokens all agree."""
    deltas: list[float] = []
    same = 0
    for ours, theirs in zip(reference, other, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            deltas += [abs(a[t] - b[t]) for t in a.keys() & b.keys()]
            if max(a, key=a.__getitem__) != max(b, key=b.__getitem__):
                break
        else:
            same += 1
    return {
        "max_abs_logprob_diff": round(max(deltas, default=0.0), 6),
        "median_abs_logprob_diff": round(statistics.median(deltas), 6) if deltas else 0.0,
        "requests_same_tokens": f"{same}/{len(reference)}",
    }


def _median_samples(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A scenario's repeats in one engine: the median tok/s and profile, and every repeat."""
    return runs[0] | {
        "output_tokens_per_second": statistics.median(r["output_tokens_per_second"] for r in runs),
        "repeats_output_tokens_per_second": [r["output_tokens_per_second"] for r in runs],
        "ms_per_step": _median_profile(runs),
        "fused_fallback_calls": runs[-1]["fused_fallback_calls"],
    }


def paired_ratios(samples: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Ratios of runs next to each other in time (the same repeat of the cycle through the
    scenarios): one/base and mixedN/one per repeat. On a machine whose speed drifts, these move
    less than ratios of medians taken minutes apart."""
    tps = {s: [r["output_tokens_per_second"] for r in runs] for s, runs in samples.items()}
    out: dict[str, list[float]] = {}
    for scenario, values in tps.items():
        against = "base" if scenario == "one" else "one" if scenario.startswith("mixed") else None
        if against in tps:
            out[f"{scenario}/{against}"] = [
                round(v / w, 3) for v, w in zip(values, tps[against], strict=True)
            ]
    return out


def run_worker(config: dict[str, Any]) -> dict[str, Any]:
    # Engine core in this process, unless VLLM_ENABLE_V1_MULTIPROCESSING=1 asks for the server's
    # layout (engine core and model worker in processes of their own; the profile then sees
    # nothing, the throughput is the server's minus HTTP).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["LORAPLEX_VLLM_PATCHES"] = "0" if config["ops"] == "vllm" else "1"
    if config["ops"] in ("loraplex-torch", "loraplex-model-dtype"):
        os.environ["LORAPLEX_LORA_KERNEL"] = "0"
    if config["ops"] == "loraplex-model-dtype":
        os.environ["LORAPLEX_LORA_FP32_ROWS"] = "0"
    if config["ops"] in ("loraplex-eager", "segmented"):  # vLLM's per-op path cannot be traced
        os.environ["LORAPLEX_COMPILE"] = "0"
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from server.engine_vllm import cpu_thread_defaults

    for key, value in cpu_thread_defaults(len(os.sched_getaffinity(0))).items():
        os.environ.setdefault(key, value)
    _isa.patch_torch(config.get("isa", "native"))  # before vLLM picks its C++ library

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    # Patched classes first (LLM() loads the plugins), then the timers around them.
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    if config["ops"] == "segmented":  # loraplex's per-op replacements only, no fused products
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

        fused = PunicaWrapperCPU.add_lora_linear.__wrapped__  # under the op for compiling
        PunicaWrapperCPU.add_lora_linear = fused.__wrapped__
    profile = _install_profile()
    if config.get("profile_kernel"):
        from server import lora_cpu_ops, vllm_patches

        profile.wrap(lora_cpu_ops.KernelWeights, "apply", "lora_kernel")  # eager model run
        build = vllm_patches._kernel_action  # compiled: the kernel call each layer's plan makes
        vllm_patches._kernel_action = lambda *args: profile.timed(build(*args), "lora_kernel")
    llm = LLM(
        model=config["model"], dtype=config["dtype"], max_model_len=2048,
        max_num_seqs=config["concurrency"], enable_lora=True, max_loras=MAX_LORAS,
        max_lora_rank=config["max_lora_rank"], max_cpu_loras=MAX_LORAS, seed=0,
        generation_config="vllm",
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in PROMPTS
    ]
    adapters = {
        name: LoRARequest(name, i + 1, path) for i, (name, path) in
        enumerate(config["adapters"].items())
    }  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=config["max_tokens"], ignore_eos=True)

    def batch(models: tuple[str | None, ...], count: int) -> tuple[list[str], list[Any]]:
        chosen = [models[i % len(models)] for i in range(count)]
        return (
            [prompts[i % len(prompts)] for i in range(count)],
            [adapters[m] if m else None for m in chosen],
        )

    samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for repeat in range(config.get("repeats", 1)):
        for scenario in config["scenarios"]:
            samples[scenario].append(
                measure_scenario(llm, profile, batch, scenario, params, config, repeat)
            )
    results: dict[str, Any] = {s: _median_samples(runs) for s, runs in samples.items()}
    results["paired_ratios"] = paired_ratios(samples)
    results["code"] = _isa.code_in_use()
    return results


# -- the driver ------------------------------------------------------------------------------------


def _run_one(config: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config))
        env = os.environ | _isa.environment(config.get("isa", "native"))
        subprocess.run([sys.executable, __file__, "--worker", str(path)], check=True, env=env)
        return json.loads((Path(tmp) / "result.json").read_text())


def _median_runs(runs: list[dict[str, Any]], scenario: str) -> dict[str, Any]:
    tps = [r[scenario]["output_tokens_per_second"] for r in runs]
    return {
        "output_tokens_per_second": round(statistics.median(tps), 1),
        "runs_output_tokens_per_second": tps,
        "ms_per_step": _median_profile([r[scenario] for r in runs]),
    }


def _median_profile(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The median of each `ms_per_step` entry over `runs` (0 where a run lacks it)."""
    profiles = [r["ms_per_step"] for r in runs]
    keys = sorted({k for p in profiles for k in p})
    return {k: round(statistics.median(p.get(k, 0.0) for p in profiles), 2) for k in keys}


def summarize(figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios: each ops' adapter scenarios against its base and one-adapter figures, and
    loraplex against vLLM per scenario."""
    out: dict[str, Any] = {}
    for ops, per in figures.items():
        base = per.get("base", {}).get("output_tokens_per_second")
        one = per.get("one", {}).get("output_tokens_per_second")
        out[ops] = {
            f"{s}/base": round(f["output_tokens_per_second"] / base, 3)
            for s, f in per.items() if base and s != "base"
        } | {
            f"{s}/one": round(f["output_tokens_per_second"] / one, 3)
            for s, f in per.items() if one and s.startswith("mixed")
        }  # fmt: skip
    if "vllm" in figures and "loraplex" in figures:
        out["loraplex/vllm"] = {
            s: round(f["output_tokens_per_second"] / figures["vllm"][s]["output_tokens_per_second"], 3)
            for s, f in figures["loraplex"].items() if s in figures["vllm"]
        }  # fmt: skip
    return out


def parameter_count(folder: Path, pattern: str) -> int:
    """Elements of every tensor in the safetensors files `pattern` matches in `folder` (headers
    only; nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob(pattern)):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                total += math.prod(f.get_slice(key).get_shape())
    return total


def arithmetic_limit(model: Path, adapter: Path, scenarios: tuple[str, ...]) -> dict[str, Any]:
    """What the arithmetic allows, from the weights each decode step must read.

    A decode step reads every base weight once (the LM head included; an embedding lookup reads
    one row per token) and, with n distinct adapters in the batch, n adapters' weights. Where a
    step is bound by reading weights (memory), tokens/s scale with 1 / bytes read: one adapter
    at most B / (B + L) of the base, n mixed at most (B + L) / (B + nL) of one adapter. Where it
    is bound by arithmetic (each row multiplies by its own adapter only), n mixed costs what one
    does: 1.0. Measured figures sit at or below the larger bound.
    """
    base = parameter_count(model, "*.safetensors")
    lora = parameter_count(adapter, "adapter_model.safetensors")
    limits: dict[str, Any] = {"base_parameters": base, "adapter_parameters": lora,
                              "adapter_share": round(lora / base, 4),
                              "one/base": round(base / (base + lora), 3)}  # fmt: skip
    for scenario in scenarios:
        n = len(SCENARIOS[scenario])
        if scenario.startswith("mixed"):
            limits[f"{scenario}/one"] = {"memory_bound": round((base + lora) / (base + n * lora), 3),
                                         "compute_bound": 1.0}  # fmt: skip
    return limits


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        config = json.loads(args.worker.read_text())
        result = run_worker(config)
        (args.worker.parent / "result.json").write_text(json.dumps(result))
        return 0
    ops = tuple(o for o in args.ops.split(",") if o)
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    if unknown := [o for o in ops if o not in OPS] + [s for s in scenarios if s not in SCENARIOS]:
        raise SystemExit(f"error: unknown ops/scenarios {unknown}")
    model = resolve_model(args.model, (args.home or default_home()).expanduser())
    adapters = ensure_adapters(model, args.work_dir.expanduser() / "adapters", ALL_ADAPTER_NAMES)
    config = {
        "model": str(model), "adapters": {n: str(p) for n, p in adapters.items()},
        "requests": args.requests, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "max_lora_rank": args.max_lora_rank,
        "scenarios": list(scenarios), "repeats": args.repeats,
        "profile_kernel": args.profile_kernel, "isa": args.isa,
        "dtype": choose_dtype(args.dtype, cpu=_isa.emulated_cpu(args.isa)).dtype,
    }  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {o: [] for o in ops}
    for round_no in range(args.rounds):
        for name in ops if round_no % 2 == 0 else tuple(reversed(ops)):
            print(f"round {round_no + 1}: {name} ops", flush=True)
            runs[name].append(_run_one({**config, "ops": name}))
    figures = {o: {s: _median_runs(runs[o], s) for s in scenarios} for o in ops}
    ratios = summarize(figures)
    paired = {
        o: {
            key: {"median": round(statistics.median(values), 4), "samples": values}
            for key in runs[o][0]["paired_ratios"]
            for values in [[v for r in runs[o] for v in r["paired_ratios"][key]]]
        }
        for o in ops
    }
    limit = arithmetic_limit(model, adapters[ALL_ADAPTER_NAMES[0]], scenarios)
    agreements = {
        f"{o}/{ops[0]}": {
            s: agreement(runs[ops[0]][0][s]["top_logprobs"], runs[o][0][s]["top_logprobs"])
            for s in scenarios
        }
        for o in ops[1:]
    }
    print("\noutput tok/s (median of rounds)")
    print(f"{'scenario':<9}" + "".join(f"{o:>12}" for o in ops))
    for s in scenarios:
        print(f"{s:<9}" + "".join(f"{figures[o][s]['output_tokens_per_second']:>12}" for o in ops))
    print(json.dumps(ratios, indent=2))
    print("paired ratios (median):", json.dumps(
        {o: {k: v["median"] for k, v in p.items()} for o, p in paired.items()}, indent=2))  # fmt: skip
    print("arithmetic limit:", json.dumps(limit, indent=2))
    print("code in use:", json.dumps({o: runs[o][0]["code"] for o in ops}))
    if agreements:
        print("top-5 log-probs against the first ops:", json.dumps(agreements, indent=2))
    out = args.out or RESULTS_DIR / f"lora_cpu-{utc_stamp()}.json"
    write_json(out, {
        "benchmark": "lora_cpu", "machine": machine_info(config["dtype"]), "settings": config | {
            "rounds": args.rounds, "max_loras": MAX_LORAS},
        "figures": figures, "ratios": ratios, "paired_ratios": paired,
        "arithmetic_limit": limit, "agreement": agreements, "runs": runs,
    })  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
