"""Distillation: ask an OpenAI-compatible teacher every prompt of a file, write chat examples.

Owns the prompts file format, the requests to the teacher (bounded concurrency, retries with
backoff), the resumable JSONL output, its `OUT.meta.json` lineage sidecar and its
`OUT.failed.jsonl` list of failures. It knows nothing of training or of the CLI, and nothing of
the teacher beyond `/v1/chat/completions`: a loraplex or vLLM server, or a hosted API.

Each prompt ends *written*, *failed* (no usable answer after retries: timeout, connection,
http_NNN, invalid_json, no_choices, no_content, empty_content) or *filtered* (a valid answer that
the rules reject: truncated, too_short, too_long, refusal). Only written prompts count as
answered, so a re-run asks the failed and filtered ones again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from loraplex import __version__

ROLES = ("system", "user", "assistant")
# Enabled by `drop_refusals`: phrases a chat model uses to decline (case-insensitive).
DEFAULT_REFUSAL_PATTERNS = (
    r"\bI(?:'m| am) sorry,? but\b",
    r"\bI can(?:no|')t (?:help|assist|comply|provide|do that)\b",
    r"\bI(?:'m| am) (?:not able|unable) to (?:help|assist|comply|provide)\b",
    r"\bI won't be able to\b",
    r"\bI must (?:decline|refuse)\b",
    r"\bas an AI(?: language model)?\b",
)
RETRIED_STATUSES = frozenset({429, *range(500, 600)})
_UNRECORDED = {"teacher_url", "teacher_model", "prompts", "out", "api_key"}


class DistillInputError(ValueError):
    """The prompts file or an existing output cannot be used; `problems` lists every one found."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class DistillSettings:
    teacher_url: str
    teacher_model: str
    prompts: Path
    out: Path
    temperature: float = 0.7
    max_tokens: int = 512
    system: str | None = None  # prepended to prompts that carry no system message
    concurrency: int = 4
    retries: int = 4  # further attempts after the first, on timeouts, connections, 429, 5xx
    timeout: float = 120.0  # seconds per request
    backoff: float = 1.0  # seconds before the first retry; doubles on each, with jitter
    max_backoff: float = 60.0
    api_key_env: str | None = None  # the variable the key came from: recorded, never the key
    api_key: str | None = field(default=None, repr=False)
    keep_truncated: bool = False
    min_chars: int = 1
    max_chars: int | None = None
    refusal_patterns: tuple[str, ...] = ()
    drop_refusals: bool = False

    def __post_init__(self) -> None:
        problems = []
        try:
            parts = urlsplit(self.teacher_url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
            _ = parts.port  # raises for a port that is not a number
        except ValueError:
            valid = False
        if not valid:
            problems.append("teacher url must be http(s)://HOST[:PORT][/v1]")
        if not self.teacher_model.strip():
            problems.append("teacher model must not be empty")
        if not 0 <= self.temperature <= 2:
            problems.append(f"temperature must be in [0, 2], got {self.temperature}")
        for name in ("max_tokens", "concurrency"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.retries < 0:
            problems.append(f"retries must be >= 0, got {self.retries}")
        for name in ("timeout", "backoff", "max_backoff"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.min_chars < 0:
            problems.append(f"min_chars must be >= 0, got {self.min_chars}")
        if self.max_chars is not None and self.max_chars < max(self.min_chars, 1):
            problems.append(f"max_chars must be >= min_chars and >= 1, got {self.max_chars}")
        for pattern in self.refusal_patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                problems.append(f"refusal pattern {pattern!r} is not a regular expression: {e}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def redacted_url(self) -> str:
        """The teacher's root URL without user, password or query (where credentials hide)."""
        parts = urlsplit(self.teacher_url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        path = parts.path.rstrip("/").removesuffix("/v1")
        return urlunsplit((parts.scheme, netloc, path, "", ""))

    @property
    def endpoint(self) -> str:
        """`{url}/v1/chat/completions`, whether the URL was given with /v1 or without."""
        parts = urlsplit(self.teacher_url)
        path = parts.path.rstrip("/").removesuffix("/v1") + "/v1/chat/completions"
        return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))

    @property
    def meta_path(self) -> Path:
        return self.out.with_name(self.out.name + ".meta.json")

    @property
    def failures_path(self) -> Path:
        return self.out.with_name(self.out.name + ".failed.jsonl")

    @cached_property
    def patterns(self) -> tuple[re.Pattern[str], ...]:
        chosen = self.refusal_patterns + (DEFAULT_REFUSAL_PATTERNS if self.drop_refusals else ())
        return tuple(re.compile(p, re.IGNORECASE) for p in chosen)

    def to_json(self) -> dict[str, Any]:
        """The sampling and filter settings the sidecar records: never the key, only its
        variable's name (teacher and prompts file are recorded on their own)."""
        recorded = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in _UNRECORDED
        }
        recorded["refusal_patterns"] = list(self.refusal_patterns)
        recorded["api_key_env"] = self.api_key_env if self.api_key else None
        return recorded


@dataclass(frozen=True)
class Prompt:
    line: int
    messages: tuple[dict[str, str], ...]  # as sent: the system prompt included

    @property
    def key(self) -> str:
        return messages_key(self.messages)


@dataclass(frozen=True)
class DistillProgress:
    total: int  # prompts to ask this run
    done: int
    written: int
    failed: int
    filtered: int


@dataclass(frozen=True)
class DistillReport:
    out: Path
    prompts: int  # prompts in the file
    unique: int
    duplicates: int  # prompts identical to an earlier one: asked once
    resumed: int  # already answered in the output: skipped
    asked: int
    written: int
    failed: dict[str, int]
    filtered: dict[str, int]
    started_at: str
    finished_at: str
    interrupted: bool = False

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    @property
    def filtered_total(self) -> int:
        return sum(self.filtered.values())

    @property
    def exit_code(self) -> int:
        """0: every prompt answered or filtered; 1: some failed after retries."""
        return 1 if self.failed_total else 0

    def counts(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "unique": self.unique,
            "duplicates": self.duplicates,
            "resumed": self.resumed,
            "asked": self.asked,
            "written": self.written,
            "failed": dict(sorted(self.failed.items())),
            "filtered": dict(sorted(self.filtered.items())),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "counts": self.counts(),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "interrupted": self.interrupted,
            "exit_code": self.exit_code,
        }


@dataclass(frozen=True)
class Outcome:
    status: str  # "written" | "failed" | "filtered"
    reason: str = ""
    detail: str = ""
    answer: str = ""


def messages_key(messages: Sequence[dict[str, Any]]) -> str:
    """A stable hash of chat messages (role and content only; key order and spacing ignored)."""
    canonical = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    text = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --- the prompts file ------------------------------------------------------------------------


def load_prompts(path: Path, *, system: str | None = None) -> list[Prompt]:
    """Every prompt of a .txt (one per line) or JSONL file; raise with every problem found."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DistillInputError([f"{path}: cannot read: {e}"]) from e
    prompts: list[Prompt] = []
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            messages, problem = [{"role": "user", "content": line.strip()}], None
        else:
            messages, problem = _parse_prompt_line(line)
        if problem is not None:
            problems.append(f"{path}:{number}: {problem}")
            continue
        if system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        prompts.append(Prompt(line=number, messages=tuple(messages)))
    if not prompts and not problems:
        problems.append(f"{path}: no prompts")
    if problems:
        raise DistillInputError(problems)
    return prompts


def _parse_prompt_line(line: str) -> tuple[list[dict[str, str]], str | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return [], f"not JSON ({e.msg})"
    if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
        return [], 'expected an object with "prompt" (a string) or "messages" (a list)'
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            return [], '"prompt" must be a non-empty string'
        return [{"role": "user", "content": prompt}], None
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return [], '"messages" must be a non-empty list'
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return [], f"messages[{i}]: role must be one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return [], f"messages[{i}]: content must be a non-empty string"
    if messages[-1]["role"] == "assistant":
        return [], "the last message is the assistant's: the prompt must end before the answer"
    return [{"role": m["role"], "content": m["content"]} for m in messages], None


# --- the output, its sidecar and failures ----------------------------------------------------


def read_answered(out: Path) -> set[str]:
    """Keys of the prompts already answered in `out`; a torn last line is truncated away.

    A prompt is asked only when its key is absent, so no (prompt, answer) is written twice.
    """
    if not out.exists():
        return set()
    data = out.read_bytes()
    prompts: set[str] = set()
    problems: list[str] = []
    offset = 0
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        last = offset + len(raw) == len(data)
        messages = _example_messages(raw)
        if messages is not None and raw.endswith(b"\n"):
            prompts.add(messages_key(messages[:-1]))
        elif raw.strip() or not raw.endswith(b"\n"):
            if last:  # killed mid-write: drop the fragment, its prompt is asked again
                with out.open("r+b") as f:
                    f.truncate(offset)
                break
            problems.append(f"{out}:{number}: not a chat example written by distill")
        offset += len(raw)
    if problems:
        raise DistillInputError(problems)
    return prompts


def _example_messages(raw: bytes) -> list[dict[str, Any]] | None:
    try:
        messages = json.loads(raw).get("messages")
    except (ValueError, AttributeError):
        return None
    if not isinstance(messages, list) or len(messages) < 2:
        return None
    return messages if all(isinstance(m, dict) for m in messages) else None


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"runs": []}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(meta, dict) and isinstance(meta.get("runs"), list):
            return meta
    except (OSError, ValueError):
        pass
    raise DistillInputError([f"{path}: not a distill sidecar; move it away to start a new one"])


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Atomically: a reader (or a kill) never sees half a sidecar."""
    teachers = {(r["teacher"]["url"], r["teacher"]["model"]) for r in meta["runs"]}
    meta["teachers"] = [{"url": u, "model": m} for u, m in sorted(teachers)]
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- asking the teacher ----------------------------------------------------------------------


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def _backoff(settings: DistillSettings, attempt: int, retry_after: float | None) -> float:
    """Retry-After when the teacher says, else exponential with jitter (half fixed, half random)."""
    if retry_after is not None:
        return min(retry_after, settings.max_backoff)
    delay = min(settings.max_backoff, settings.backoff * 2**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


def _error_message(response: httpx.Response) -> str:
    """The message of an OpenAI-shaped error body, else the body itself."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text
    return message if isinstance(message, str) else response.text


def _redact(text: str, secret: str | None) -> str:
    text = " ".join(text.split())[:300]
    return text.replace(secret, "***") if secret else text


async def _ask(client: httpx.AsyncClient, settings: DistillSettings, prompt: Prompt) -> Outcome:
    """One prompt to the teacher, with retries; the answer, or why there is none."""
    body = {
        "model": settings.teacher_model,
        "messages": list(prompt.messages),
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
    }
    for attempt in range(settings.retries + 1):
        retry_after = None
        try:
            async with asyncio.timeout(settings.timeout):  # the whole request, not each read
                response = await client.post(settings.endpoint, json=body)
        except (httpx.TimeoutException, TimeoutError):
            failure = Outcome("failed", "timeout", f"no answer within {settings.timeout} s")
        except httpx.TransportError as e:
            failure = Outcome("failed", "connection", repr(e))
        else:
            if response.is_success:
                return _judge(settings, response)
            failure = Outcome("failed", f"http_{response.status_code}", _error_message(response))
            if response.status_code not in RETRIED_STATUSES:
                break
            retry_after = _retry_after(response)
        if attempt < settings.retries:
            await asyncio.sleep(_backoff(settings, attempt, retry_after))
    return Outcome(failure.status, failure.reason, _redact(failure.detail, settings.api_key))


def _judge(settings: DistillSettings, response: httpx.Response) -> Outcome:
    """A 2xx response: garbage fails, filters filter, the rest is the answer."""
    try:
        data = response.json()
    except ValueError:
        return Outcome("failed", "invalid_json", _redact(response.text, settings.api_key))
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return Outcome("failed", "no_choices", _redact(response.text, settings.api_key))
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        return Outcome("failed", "no_content", _redact(response.text, settings.api_key))
    if not content.strip():
        return Outcome("failed", "empty_content")
    if choices[0].get("finish_reason") == "length" and not settings.keep_truncated:
        return Outcome("filtered", "truncated")
    size = len(content.strip())
    if size < settings.min_chars:
        return Outcome("filtered", "too_short")
    if settings.max_chars is not None and size > settings.max_chars:
        return Outcome("filtered", "too_long")
    if any(p.search(content) for p in settings.patterns):
        return Outcome("filtered", "refusal")
    return Outcome("written", answer=content)


# --- the run ---------------------------------------------------------------------------------


@dataclass
class _Run:
    """Mutable state of one run: counters and the open output files."""

    settings: DistillSettings
    total: int
    progress: Callable[[DistillProgress], None] | None
    written: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)

    def record(self, prompt: Prompt, outcome: Outcome, out, failures) -> None:
        if outcome.status == "written":
            example = [*prompt.messages, {"role": "assistant", "content": outcome.answer}]
            out.write(json.dumps({"messages": example}, ensure_ascii=False) + "\n")
            out.flush()  # one complete line at a time: a kill tears at most the last one
            self.written += 1
        elif outcome.status == "failed":
            self.failed[outcome.reason] += 1
            line = {"line": prompt.line, "messages": list(prompt.messages)}
            line |= {"reason": outcome.reason, "detail": outcome.detail}
            failures.write(json.dumps(line, ensure_ascii=False) + "\n")
            failures.flush()
        else:
            self.filtered[outcome.reason] += 1
        self.report_progress()

    @property
    def done(self) -> int:
        return self.written + self.failed.total() + self.filtered.total()

    def report_progress(self) -> None:
        if self.progress is not None:
            failed, filtered = self.failed.total(), self.filtered.total()
            self.progress(DistillProgress(self.total, self.done, self.written, failed, filtered))


async def distill(
    settings: DistillSettings, *, progress: Callable[[DistillProgress], None] | None = None
) -> DistillReport:
    """Ask the teacher every prompt not yet answered in `settings.out`; append the answers.

    Raises DistillInputError for an unusable prompts file, output or sidecar. Cancelling it
    (Ctrl-C) leaves every written line complete and the run recorded as interrupted.
    """
    prompts = load_prompts(settings.prompts, system=settings.system)
    answered = read_answered(settings.out)
    meta = _read_meta(settings.meta_path)
    first: dict[str, Prompt] = {}
    for prompt in prompts:
        first.setdefault(prompt.key, prompt)  # identical prompts are asked once
    unique = list(first.values())
    pending = [p for p in unique if p.key not in answered]
    started_at = _now()
    run = _Run(settings=settings, total=len(pending), progress=progress)
    record: dict[str, Any] = {
        "teacher": {"url": settings.redacted_url, "model": settings.teacher_model},
        "settings": settings.to_json(),
        "prompts": {"path": str(settings.prompts), "sha256": _sha256(settings.prompts)},
        "loraplex_version": __version__,
        "started_at": started_at,
        "finished_at": None,
        "status": "running",
    }
    meta["runs"].append(record)
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    _write_meta(settings.meta_path, meta)
    interrupted = True
    try:
        await _ask_all(settings, run, pending)
        interrupted = False
    finally:
        report = DistillReport(
            out=settings.out,
            prompts=len(prompts),
            unique=len(unique),
            duplicates=len(prompts) - len(unique),
            resumed=len(unique) - len(pending),
            asked=run.done,
            written=run.written,
            failed=dict(run.failed),
            filtered=dict(run.filtered),
            started_at=started_at,
            finished_at=_now(),
            interrupted=interrupted,
        )
        record |= {"counts": report.counts(), "finished_at": report.finished_at}
        record["status"] = "interrupted" if interrupted else "finished"
        _write_meta(settings.meta_path, meta)
        if not run.failed and settings.failures_path.exists():
            settings.failures_path.unlink()
    return report


async def _ask_all(settings: DistillSettings, run: _Run, pending: list[Prompt]) -> None:
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    slots = asyncio.Semaphore(settings.concurrency)
    run.report_progress()
    with (
        settings.out.open("a", encoding="utf-8") as out,
        settings.failures_path.open("w", encoding="utf-8") as failures,
    ):
        limits = httpx.Limits(max_connections=settings.concurrency)
        timeout = httpx.Timeout(settings.timeout)
        async with (
            httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client,
            asyncio.TaskGroup() as tasks,
        ):

            async def one(prompt: Prompt) -> None:
                try:
                    run.record(prompt, await _ask(client, settings, prompt), out, failures)
                finally:
                    slots.release()

            for prompt in pending:
                await slots.acquire()  # at most `concurrency` prompts in flight (and as tasks)
                tasks.create_task(one(prompt))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_distill(
    settings: DistillSettings, *, progress: Callable[[DistillProgress], None] | None = None
) -> DistillReport:
    """`distill` for synchronous callers."""
    return asyncio.run(distill(settings, progress=progress))
