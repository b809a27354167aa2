"""First-token latency of an adapter version by where it is when the request arrives:
(a) loaded in the engine, (b) on the server's disk but not loaded, (c) only in the artifact
store (a real S3 API over HTTP: moto's server on loopback). Also: after a promotion, does the
first request to NAME pay (b) or (c)? (It should not: the server warms before it routes.)

Each version is a distinct rank-16 adapter (q/k/v/o) of the embedded model: the bench adapters
with their B matrices scaled by a per-version factor, so every version has its own sha256.

    python bench/adapter_load.py [--samples 5] [--out bench/results/adapter_load-<UTC>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._adapters import ensure_adapters  # noqa: E402
from bench._machine import machine_info  # noqa: E402
from bench._servers import EngineSettings, free_port, loraplex_spec, running  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAME = "bench"
PROMPT = [{"role": "user", "content": "Say hello."}]


def variant(source: Path, dest: Path, *, factor: float) -> Path:
    """A copy of `source` with lora_B scaled by `factor`: same shapes and cost, new bytes."""
    from safetensors.numpy import load_file, save_file

    dest.mkdir(parents=True)
    shutil.copy(source / "adapter_config.json", dest / "adapter_config.json")
    tensors = load_file(str(source / "adapter_model.safetensors"))
    scaled = {k: (v * factor if "lora_B" in k else v) for k, v in tensors.items()}
    save_file(scaled, str(dest / "adapter_model.safetensors"))
    return dest


def ttft_ms(base_url: str, model: str) -> float:
    """Milliseconds from sending a streaming request to its first content chunk."""
    body = {"model": model, "messages": PROMPT, "max_tokens": 4, "stream": True, "temperature": 0}
    started = time.perf_counter()
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {r.status_code}: {r.read().decode()[:300]}")
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content": ""' not in line:
                return (time.perf_counter() - started) * 1000
    raise RuntimeError(f"{model}: no content")


def metric(base_url: str, name: str) -> float | None:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def start_moto() -> tuple[object, str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 call otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def register_versions(registry, folders: list[Path]) -> list:
    return [registry.register(NAME, folder, actor="bench") for folder in folders]


def measure(base_url: str, registry, versions: dict[str, list], *, samples: int) -> dict:
    on_disk, in_store, promoted = versions["disk"], versions["store"], versions["promote"]
    figures: dict[str, list[float]] = {"loaded": [], "on_disk": [], "store_only": []}
    ttft_ms(base_url, "smollm2")  # warm the engine itself
    for i in range(samples):
        figures["on_disk"].append(ttft_ms(base_url, on_disk[i].ref))
        figures["store_only"].append(ttft_ms(base_url, in_store[i].ref))
        figures["loaded"].append(ttft_ms(base_url, on_disk[i].ref))
    after_promotion, loads_before_request = [], []
    for version in promoted:
        registry.store.promote(NAME, version.number, actor="bench", reason="bench")
        target = registry.store.revision()
        while (metric(base_url, "loraplex_registry_revision") or 0) < target:
            time.sleep(0.05)
        loads = metric(
            base_url, f'loraplex_adapter_loads_total{{adapter="{version.ref}",status="ok"}}'
        )
        loads_before_request.append(loads or 0.0)
        after_promotion.append(ttft_ms(base_url, NAME))
    figures["first_after_promotion"] = after_promotion
    return {"samples_ms": figures, "loads_before_first_request": loads_before_request}


def summarize(raw: dict) -> dict:
    med = {k: statistics.median(v) for k, v in raw["samples_ms"].items()}
    loaded = med["loaded"]
    return {
        "median_ttft_ms": {k: round(v, 1) for k, v in med.items()},
        "ratio_vs_loaded": {k: round(v / loaded, 2) for k, v in med.items()},
        "added_ms_vs_loaded": {k: round(v - loaded, 1) for k, v in med.items()},
        "promotions_warmed_before_traffic": all(x >= 1 for x in raw["loads_before_first_request"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=5, help="versions measured per condition")
    p.add_argument(
        "--home", type=Path, default=Path(os.environ.get("LORAPLEX_HOME", "~/.loraplex"))
    )
    p.add_argument("--work-dir", type=Path, default=Path("~/.cache/loraplex-bench"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from registry.service import Registry
    from registry.settings import RegistrySettings

    model_dir = (args.home.expanduser() / "models" / "smollm2-135m-instruct").resolve()
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"error: no model at {model_dir}; run `loraplex model prepare`")
    source = ensure_adapters(model_dir, args.work_dir.expanduser() / "adapters")["a1"]
    moto, endpoint = start_moto()
    s3_env = {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
    }  # fmt: skip
    os.environ.update(s3_env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as tmp:
        home = Path(tmp)
        settings = RegistrySettings(home=home, artifacts="s3://bench/adapters")
        counts = {"disk": args.samples, "store": args.samples, "promote": 3}
        folders = [
            variant(source, home / "src" / f"v{i}", factor=1.0 + 0.01 * i)
            for i in range(sum(counts.values()))
        ]
        with Registry.open(settings) as registry:
            records = register_versions(registry, folders)
            versions, start = {}, 0
            for key, n in counts.items():
                versions[key], start = records[start : start + n], start + n
            for version in versions["disk"]:  # (b): put them where the server's cache looks
                registry.fetch(version, home / "cache" / "adapters" / version.sha256)
            engine = EngineSettings(model_dir=model_dir, adapters={}, kv_cache_gib=1)
            port = free_port()
            spec = loraplex_spec(engine, port=port, home=home)
            spec.env.update(s3_env, LORAPLEX_ARTIFACTS="s3://bench/adapters")
            spec.env["LORAPLEX_REGISTRY_POLL_SECONDS"] = "0.5"
            with running(spec, port=port, log_path=home / "server.log") as server:
                raw = measure(server.base_url, registry, versions, samples=args.samples)
    moto.stop()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    document = {
        "benchmark": "adapter_load",
        "finished_utc": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(engine.dtype),
        "settings": {"samples": args.samples, "rank": 16, "artifact_store": "S3 API (moto)"},
        "raw": raw,
        "summary": summarize(raw),
    }
    out = args.out or RESULTS_DIR / f"adapter_load-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document["summary"], indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
