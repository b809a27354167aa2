"""The train/serve agreement gate: before an adapter is registered, prove the served adapter
behaves as trained.

The adapter is loaded into the real engine by starting `loraplex serve` on it (a child process,
spoken to over HTTP only, so the trainer does not depend on the server's code), and checked on
held-out prompts against peft's own greedy answers:

* vLLM accepts it: the server starts with it, lists it and answers through it;
* answers agree with peft's: greedy texts compared by similarity (bf16 kernels differ between the
  engine and torch, so exact equality is not the test; a chat-template or weight-mapping mistake
  gives unrelated texts);
* answers end: the served answer stops with the end-of-turn token within `max_tokens`, not by
  running out of length (the classic template / EOS mismatch that never stops);
* it is not a no-op: the served adapter's answers differ from the served base model's.

The result goes into the run's manifest; `loraplex train --register` refuses a failing adapter
unless `--force`, which is recorded too.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

GATE_ADAPTER = "gate-candidate"
DEFAULT_MAX_TOKENS = 96
DEFAULT_SIMILARITY = 0.6  # mean text similarity (difflib ratio) between peft and served answers
DEFAULT_ENDED_SHARE = 0.75  # share of served answers that must stop by themselves
_READY_TIMEOUT_SECONDS = 600.0


class GateError(Exception):
    """The gate could not run (the server would not start, the model folder is wrong)."""


@dataclass(frozen=True, slots=True)
class PromptCheck:
    prompt: str
    peft: str
    served: str
    base: str
    similarity: float
    ended: bool  # served answer stopped with end-of-turn
    changed: bool  # served adapter answer differs from the served base answer


@dataclass(frozen=True, slots=True)
class GateResult:
    passed: bool
    accepted: bool
    agreement: float
    ended_share: float
    changed_share: float
    problems: list[str]
    checks: list[PromptCheck] = field(default_factory=list)
    seconds: float = 0.0
    forced: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_gate(
    *,
    model_dir: Path,
    adapter_dir: Path,
    prompts: Sequence[str],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    min_similarity: float = DEFAULT_SIMILARITY,
    min_ended_share: float = DEFAULT_ENDED_SHARE,
    dtype: str = "auto",
    max_lora_rank: int = 16,
    peft_answers: Callable[[Sequence[str]], list[str]] | None = None,
) -> GateResult:
    """Serve `adapter_dir` on `model_dir` and check it on `prompts` (a handful of held-out ones)."""
    if not prompts:
        raise GateError("the gate needs at least one held-out prompt")
    started = time.monotonic()
    peft = (peft_answers or _peft_answerer(model_dir, adapter_dir, max_tokens, dtype))(prompts)
    problems: list[str] = []
    try:
        with served(model_dir, adapter_dir, dtype=dtype, max_lora_rank=max_lora_rank) as url:
            served_answers = [_chat(url, GATE_ADAPTER, p, max_tokens) for p in prompts]
            base_answers = [_chat(url, "base", p, max_tokens) for p in prompts]
    except GateError as e:
        return GateResult(
            passed=False, accepted=False, agreement=0.0, ended_share=0.0, changed_share=0.0,
            problems=[f"the engine did not accept the adapter: {e}"],
            seconds=time.monotonic() - started,
        )  # fmt: skip
    checks = [
        PromptCheck(
            prompt=p,
            peft=pa,
            served=sa,
            base=ba,
            similarity=difflib.SequenceMatcher(None, pa, sa).ratio(),
            ended=finish == "stop",
            changed=sa.strip() != ba.strip(),
        )  # fmt: skip
        for p, pa, (sa, finish), (ba, _) in zip(
            prompts, peft, served_answers, base_answers, strict=True
        )
    ]
    n = len(checks)
    agreement = sum(c.similarity for c in checks) / n
    ended = sum(c.ended for c in checks) / n
    changed = sum(c.changed for c in checks) / n
    if agreement < min_similarity:
        problems.append(
            f"served answers differ from peft's (mean similarity {agreement:.2f} < "
            f"{min_similarity}): a chat-template or weight-loading mismatch"
        )
    if ended < min_ended_share:
        problems.append(
            f"only {ended:.0%} of served answers stop by themselves within {max_tokens} tokens "
            f"(need {min_ended_share:.0%}): the adapter does not produce the end-of-turn token"
        )
    if changed == 0:
        problems.append(
            "the served adapter answers exactly like the base model on every prompt: it is a "
            "no-op as served (not trained, or not applied by the engine)"
        )
    return GateResult(
        passed=not problems, accepted=True, agreement=agreement, ended_share=ended,
        changed_share=changed, problems=problems, checks=checks,
        seconds=time.monotonic() - started,
    )  # fmt: skip


# -- the engine side: `loraplex serve` in a child process -------------------------------------


@contextlib.contextmanager
def served(model_dir: Path, adapter_dir: Path, *, dtype: str, max_lora_rank: int) -> Iterator[str]:
    """`loraplex serve` with the adapter as a local folder; yields its base URL."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="loraplex-gate-") as home:
        command = [
            sys.executable, "-m", "loraplex.cli", "serve", "--model", str(model_dir),
            "--adapter", f"{GATE_ADAPTER}={adapter_dir}", "--served-name", "base",
            "--port", str(port), "--max-loras", "1", "--max-lora-rank", str(max_lora_rank),
            "--kv-cache-gib", "1", "--max-model-len", "1024", "--max-num-seqs", "4",
            "--dtype", dtype, "--home", home,
        ]  # fmt: skip
        log = Path(home) / "serve.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "LORAPLEX_HOME": home},
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, process, log)
            yield url
        finally:
            _stop(process)


def _wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise GateError(f"`loraplex serve` exited with {process.returncode}: {tail.strip()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise GateError(f"`loraplex serve` was not ready within {_READY_TIMEOUT_SECONDS:.0f} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _chat(url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, str]:
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
        },  # fmt: skip
        timeout=300,
    )
    if reply.status_code != 200:
        raise GateError(f"{model}: HTTP {reply.status_code}: {reply.text[:300]}")
    choice = reply.json()["choices"][0]
    return choice["message"]["content"] or "", choice["finish_reason"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the training side: peft's own greedy answers ---------------------------------------------


def _peft_answerer(
    model_dir: Path, adapter_dir: Path, max_tokens: int, dtype: str
) -> Callable[[Sequence[str]], list[str]]:
    def answer(prompts: Sequence[str]) -> list[str]:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from loraplex.hardware import choose_dtype

        chosen = choose_dtype(dtype, cuda=torch.cuda.is_available()).dtype
        torch_dtype = torch.bfloat16 if chosen == "bfloat16" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        answers = []
        for prompt in prompts:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True,
                return_tensors="pt", return_dict=True,
            )  # fmt: skip
            with torch.no_grad():
                out = model.generate(
                    **ids, max_new_tokens=max_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                )  # fmt: skip
            new = out[0][ids["input_ids"].shape[1] :]
            answers.append(tokenizer.decode(new, skip_special_tokens=True))
        return answers

    return answer


# -- serving registry versions: what `loraplex eval` talks to ---------------------------------


@contextlib.contextmanager
def served_registry(
    model_dir: Path,
    *,
    registry_url: str,
    artifacts_url: str,
    served_name: str,
    dtype: str,
    max_lora_rank: int,
    max_loras: int = 2,
) -> Iterator[str]:
    """`loraplex serve` on a registry, so NAME@V resolves as in production; yields its URL."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="loraplex-serve-") as home:
        command = [
            sys.executable, "-m", "loraplex.cli", "serve", "--model", str(model_dir),
            "--registry", registry_url, "--artifacts", artifacts_url,
            "--served-name", served_name, "--port", str(port), "--max-loras", str(max_loras),
            "--max-lora-rank", str(max_lora_rank), "--kv-cache-gib", "1",
            "--max-model-len", "2048", "--max-num-seqs", "8", "--dtype", dtype, "--home", home,
        ]  # fmt: skip
        log = Path(home) / "serve.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "LORAPLEX_HOME": home},
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, process, log)
            yield url
        finally:
            _stop(process)


def chat_completion(
    url: str, model: str, messages: Sequence[dict[str, str]], *, max_tokens: int
) -> dict[str, Any]:
    """One greedy chat completion: {"content", "finish_reason", "model" (what served it)}."""
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": model,
            "messages": list(messages),
            "temperature": 0,
            "max_tokens": max_tokens,
        },  # fmt: skip
        timeout=300,
    )
    if reply.status_code != 200:
        raise GateError(f"{model}: HTTP {reply.status_code}: {reply.text[:300]}")
    data = reply.json()
    choice = data["choices"][0]
    return {
        "content": choice["message"]["content"] or "",
        "finish_reason": choice["finish_reason"],
        "model": data.get("model", model),
    }
