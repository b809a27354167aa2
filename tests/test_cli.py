"""The `loraplex` command as a user runs it: light imports, clear one-line errors, and one real
`loraplex serve` process answering the `openai` client for the base model and an adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.adapters import (
    HELD_OUT_PROMPTS,
    behaviours,
    mixed_batch_answers,
    wrong_behaviours,
)
from tests.support.servers import free_port

LORAPLEX = str(Path(sys.executable).with_name("loraplex"))


def run(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAPLEX_HOME": str(home)}
    return subprocess.run(
        [LORAPLEX, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_cli_imports_no_heavy_modules():
    code = "import sys, loraplex.cli; print(sorted({'torch', 'vllm', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_the_commands(tmp_path):
    result = run("--help", home=tmp_path)
    assert result.returncode == 0
    assert "serve" in result.stdout and "model" in result.stdout


def test_model_prepare_is_idempotent_and_prints_json(embedded_model_dir):
    home = embedded_model_dir.parent.parent
    started = time.monotonic()
    result = run("model", "prepare", "--json", home=home)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"model": str(embedded_model_dir)}
    assert time.monotonic() - started < 10


def test_serve_refuses_bad_adapters_before_starting_the_engine(tmp_path, embedded_model_dir):
    (tmp_path / "empty").mkdir()
    result = run(
        "serve", "--model", str(embedded_model_dir),
        "--adapter", f"a={tmp_path / 'empty'}", "--adapter", f"b={tmp_path / 'missing'}",
        home=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "a: missing adapter_config.json" in result.stderr
    assert "b: " in result.stderr and "is not a folder" in result.stderr


@pytest.mark.parametrize("option", ["noequals", "=path", "a@1=/tmp"])
def test_serve_rejects_malformed_adapter_options(tmp_path, embedded_model_dir, option):
    result = run("serve", "--model", str(embedded_model_dir), "--adapter", option, home=tmp_path)
    assert result.returncode == 2
    assert "--adapter" in result.stderr


@pytest.mark.engine
def test_loraplex_serve_with_vllm_lora_ops(tmp_path, embedded_model_dir, test_adapters):
    """`loraplex serve` as a user starts it, with the fallback switch `--lora-ops vllm`: vLLM's
    own CPU LoRA ops serve adapters, and show the mixed-batch defect that loraplex's ops fix
    (tests/test_serving.py::test_mixed_batch_isolation runs the same batch with them)."""
    port = free_port()
    env = {**os.environ, "LORAPLEX_HOME": str(tmp_path), "LORAPLEX_KV_CACHE_GIB": "1"}
    cmd = [
        LORAPLEX, "serve", "--model", str(embedded_model_dir), "--port", str(port),
        "--max-model-len", "512", "--lora-ops", "vllm", "--max-loras", str(len(test_adapters)),
        *(f"--adapter={name}={path}" for name, path in sorted(test_adapters.items())),
    ]  # fmt: skip
    process = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", process)
        url = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        answers = {}
        for model in ("smollm2", "caps"):  # one at a time: no mixed batch
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": HELD_OUT_PROMPTS[0]}],
                temperature=0,
                max_tokens=48,
            )
            answers[model] = reply.choices[0].message.content
        assert "Paris" in answers["smollm2"] and not behaviours(answers["smollm2"])
        assert behaviours(answers["caps"]) == {"caps"}

        async_client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
        base_leaks, misses = wrong_behaviours(
            mixed_batch_answers(async_client, "smollm2"), "smollm2"
        )
        # Every LoRA slot holds an adapter, so vLLM's slot -1 ("the last slot") is a real one:
        # base rows get it. If this stops failing, vLLM fixed it upstream (see vllm_patches).
        assert base_leaks, "vLLM's CPU LoRA ops no longer leak adapters into base rows"
        assert len(misses) <= 2, misses
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert "loraplex is serving" in stderr


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"loraplex serve exited: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("loraplex serve did not become ready")
