"""Training data: read chat and preference JSONL, report every problem at once, split it.

Owns the row formats (OpenAI chat fine-tuning rows, prompt/completion rows, preference rows as
prompt/chosen/rejected or as OpenAI's DPO rows), the checks a file passes before training
(structure, roles, weights, duplicates, overlap with a validation file, length after the model's
chat template) and a deterministic train/validation split. It trains nothing; transformers is
imported only when a length check runs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
KINDS = ("chat", "preference")
# Row format -> the dataset kind it belongs to (prompt/completion rows become chat examples).
FORMATS = {"chat": "chat", "prompt/completion": "chat", "preference": "preference",
           "preference (OpenAI)": "preference"}  # fmt: skip
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
# OpenAI's DPO rows: {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant",
# ...}], "non_preferred_output": [...]}, as its fine-tuning API takes them.
OPENAI_PREFERENCE_FIELDS = ("input", "preferred_output", "non_preferred_output")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    weight: int | None = None  # assistant only; 0 = not trained on (OpenAI's semantics)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.weight is not None:
            data["weight"] = self.weight
        return data


@dataclass(frozen=True, slots=True)
class ChatExample:
    line: int
    messages: tuple[Message, ...]

    def to_json(self) -> dict[str, Any]:
        return {"messages": [m.to_json() for m in self.messages]}


@dataclass(frozen=True, slots=True)
class PreferenceExample:
    line: int
    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": [m.to_json() for m in self.prompt],
            "chosen": [m.to_json() for m in self.chosen],
            "rejected": [m.to_json() for m in self.rejected],
        }


Example = ChatExample | PreferenceExample


@dataclass(frozen=True, slots=True)
class Problem:
    line: int | None  # None: the file as a whole
    message: str

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "message": self.message}


@dataclass(frozen=True, slots=True)
class Dataset:
    path: Path
    kind: str  # "chat" | "preference"
    examples: tuple[Example, ...]  # the rows without problems, in file order
    problems: tuple[Problem, ...]
    sha256: str  # of the file's bytes ("" when it could not be read)


@dataclass
class Report:
    dataset: Dataset
    problems: list[Problem]  # every problem: the file's rows, duplicates, overlap, length
    summary: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.dataset.path),
            "ok": self.ok,
            "problems": [p.to_json() for p in self.problems],
            "summary": self.summary,
        }


class DatasetError(ValueError):
    """A file refused because of its problems; `problems` holds every one."""

    def __init__(self, path: Path, problems: Sequence[Problem]) -> None:
        self.path = path
        self.problems = tuple(problems)
        listed = "; ".join(str(p) for p in self.problems)
        super().__init__(f"{path}: {len(self.problems)} problem(s): {listed}")


def read_dataset(path: Path, *, kind: str = "auto") -> Dataset:
    """Parse a JSONL file; bad content never raises, it is listed in `problems` (all of it)."""
    if kind not in ("auto", *KINDS):
        raise ValueError(f"kind must be auto, chat or preference, got {kind!r}")
    path = Path(path)
    fallback_kind = "chat" if kind == "auto" else kind
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Dataset(path, fallback_kind, (), (Problem(None, f"file not found: {path}"),), "")
    except OSError as e:
        problem = Problem(None, f"cannot read {path}: {e.strerror or e}")
        return Dataset(path, fallback_kind, (), (problem,), "")
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        problem = Problem(None, f"not UTF-8: byte 0x{data[e.start]:02x} on line {line}")
        return Dataset(path, fallback_kind, (), (problem,), digest)
    rows = [(n, row) for n, row in enumerate(file_lines(text), 1) if row.strip()]
    if not rows:
        return Dataset(path, fallback_kind, (), (Problem(None, "empty file: no examples"),), digest)

    problems: list[Problem] = []
    examples: list[Example] = []
    first: tuple[str, int] | None = None  # the file's row format and where it was first seen
    for line, row in rows:
        fmt, example, found = _parse_row(line, row)
        if fmt is not None and kind != "auto" and FORMATS[fmt] != kind:
            found.append(f"a {fmt} row in a {kind} dataset")
        elif fmt is not None and first is None:
            first = (fmt, line)
        elif fmt is not None and first is not None and fmt != first[0]:
            found.append(f"mixed formats: a {fmt} row, but line {first[1]} is a {first[0]} row")
        problems.extend(Problem(line, message) for message in found)
        if example is not None and not found:
            examples.append(example)
    resolved = kind if kind != "auto" else FORMATS[first[0]] if first else "chat"
    return Dataset(path, resolved, tuple(examples), tuple(problems), digest)


def file_lines(text: str) -> list[str]:
    """Physical lines. Not str.splitlines: JSON strings may hold a raw U+2028 or form feed."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _parse_row(line: int, text: str) -> tuple[str | None, Example | None, list[str]]:
    """(the row's format, its example when it has no problems, its problems)."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return None, None, [f"bad JSON: {e.msg} (column {e.colno})"]
    except (ValueError, RecursionError) as e:  # an over-long integer; nesting past the stack
        return None, None, [f"bad JSON: {e.__class__.__name__}: {e}"[:200]]
    if not isinstance(row, dict):
        return None, None, [f"not a JSON object (got {_json_type(row)})"]
    problems: list[str] = []
    example: Example
    if any(key in row for key in OPENAI_PREFERENCE_FIELDS):
        fmt, example = "preference (OpenAI)", _openai_preference_row(line, row, problems)
    elif "chosen" in row or "rejected" in row:
        fmt, example = "preference", _preference_row(line, row, problems)
    elif "messages" in row:
        fmt = "chat"
        example = ChatExample(line, _messages(row["messages"], "", problems))
        _check_conversation(example.messages, problems)
    elif "prompt" in row or "completion" in row:
        fmt = "prompt/completion"
        prompt, completion = _text(row, "prompt", problems), _text(row, "completion", problems)
        example = ChatExample(line, (Message("user", prompt), Message("assistant", completion)))
    else:
        keys = ", ".join(sorted(row)) or "none"
        expected = (
            "'messages'; 'prompt' and 'completion'; 'prompt', 'chosen' and 'rejected'; or "
            "'input', 'preferred_output' and 'non_preferred_output'"
        )
        return None, None, [f"unknown row format: expected {expected} (keys: {keys})"]
    return fmt, (None if problems else example), problems


def _messages(
    value: Any, where: str, problems: list[str], *, only: str | None = None
) -> tuple[Message, ...]:
    """A list of {role, content, weight?} objects; every problem appended to `problems`."""
    if not isinstance(value, list) or not value:
        problems.append(f"'{where or 'messages'}' must be a non-empty list of messages")
        return ()
    messages = []
    for i, item in enumerate(value, 1):
        label = f"{where} message {i}".lstrip()
        if not isinstance(item, dict):
            problems.append(f"{label}: not a JSON object (got {_json_type(item)})")
            continue
        role = item.get("role")
        if role is None:
            problems.append(f"{label}: missing 'role'")
        elif role not in ROLES:
            problems.append(f"{label}: unknown role {json.dumps(role)} (expected {_or(ROLES)})")
        elif only is not None and role != only:
            problems.append(f"{label}: role must be {only}, got {role}")
        if isinstance(role, str):
            label = f"{label} ({role})"
        content = item.get("content")
        if content is None:
            problems.append(f"{label}: missing content")
        elif not isinstance(content, str):
            problems.append(f"{label}: content must be a string, got {_json_type(content)}")
        elif not content.strip():
            problems.append(f"{label}: empty content")
        weight = item.get("weight")
        if "weight" in item and role != "assistant":
            problems.append(f"{label}: 'weight' is only allowed on assistant messages")
        elif "weight" in item and (type(weight) is not int or weight not in (0, 1)):
            problems.append(f"{label}: weight must be 0 or 1, got {json.dumps(weight)}")
        content = content if isinstance(content, str) else ""
        messages.append(Message(str(role), content, weight if type(weight) is int else None))
    return tuple(messages)


def _check_conversation(messages: Sequence[Message], problems: list[str]) -> None:
    if not messages:
        return
    assistant = [m for m in messages if m.role == "assistant"]
    if not assistant:
        problems.append("no assistant message: nothing to train on")
        return
    if messages[-1].role != "assistant":
        problems.append(f"the last message is {messages[-1].role}; it must be assistant")
    if all(m.weight == 0 for m in assistant):
        problems.append("every assistant message has weight 0: nothing to train on")


def _text(row: dict[str, Any], key: str, problems: list[str]) -> str:
    value = row.get(key)
    if key not in row:
        problems.append(f"missing '{key}'")
    elif not isinstance(value, str):
        problems.append(f"'{key}' must be a string, got {_json_type(value)}")
    elif not value.strip():
        problems.append(f"'{key}' is empty")
    return value if isinstance(value, str) else ""


def _preference_row(line: int, row: dict[str, Any], problems: list[str]) -> PreferenceExample:
    missing = [f"'{key}'" for key in PREFERENCE_FIELDS if key not in row]
    if missing:
        problems.append(f"preference row missing {', '.join(missing)}")
    sides = {}
    for key, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
        value = row.get(key)
        if key not in row:
            sides[key] = ()
        elif isinstance(value, str):
            sides[key] = (Message(role, _text(row, key, problems)),)
        elif isinstance(value, list):
            sides[key] = _messages(value, key, problems, only=None if key == "prompt" else role)
        else:
            problems.append(f"'{key}' must be a string or a list of messages")
            sides[key] = ()
    if sides["chosen"] and _normal(sides["chosen"]) == _normal(sides["rejected"]):
        problems.append("chosen and rejected are identical")
    return PreferenceExample(line, sides["prompt"], sides["chosen"], sides["rejected"])


def _openai_preference_row(
    line: int, row: dict[str, Any], problems: list[str]
) -> PreferenceExample:
    missing = [f"'{key}'" for key in OPENAI_PREFERENCE_FIELDS if key not in row]
    if missing:
        problems.append(f"preference row missing {', '.join(missing)}")
    given, prompt = row.get("input"), ()
    if "input" not in row:
        pass
    elif not isinstance(given, dict) or "messages" not in given:
        problems.append("'input' must be an object with 'messages'")
    else:
        prompt = _messages(given["messages"], "input", problems)
        if prompt and prompt[-1].role == "assistant":
            problems.append("the last input message is assistant; the outputs answer it")
        if given.get("tools"):
            problems.append("'input.tools' is not supported: tool calls are not trained")
    chosen, rejected = (
        _messages(row[key], key, problems, only="assistant") if key in row else ()
        for key in OPENAI_PREFERENCE_FIELDS[1:]
    )
    if chosen and _normal(chosen) == _normal(rejected):
        problems.append("preferred_output and non_preferred_output are identical")
    return PreferenceExample(line, prompt, chosen, rejected)


def _normal(messages: Iterable[Message]) -> list[list[str]]:
    """Roles and contents with whitespace runs collapsed: what makes two examples the same."""
    return [[m.role, " ".join(m.content.split())] for m in messages]


def example_key(example: Example) -> str:
    """A hash of the example's normalised content (weights and line ignored): equal keys are
    duplicates, flagged by `validate` and kept on one side by `split`."""
    if isinstance(example, ChatExample):
        body: list[Any] = ["chat", _normal(example.messages)]
    else:
        body = [
            "preference",
            *(_normal(s) for s in (example.prompt, example.chosen, example.rejected)),
        ]
    canonical = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def validate(
    path: Path,
    *,
    tokenizer_dir: Path | None = None,
    max_seq_len: int = 2048,
    val: Path | None = None,
    kind: str = "auto",
) -> Report:
    """Every problem of a training file (and of its overlap with `val`), plus a summary.
    Without `tokenizer_dir` the length check is skipped, and the summary says so. Raises
    ValueError only for bad arguments (a tokenizer folder that cannot be loaded)."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be at least 1, got {max_seq_len}")
    dataset = read_dataset(path, kind=kind)
    problems = list(dataset.problems) + duplicate_problems(dataset.examples)
    if val is not None:
        problems += overlap_problems(dataset, read_dataset(val, kind=dataset.kind))
    lengths: list[int] | None = None
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(Path(tokenizer_dir))
        lengths, refused = token_counts(dataset.examples, tokenizer)
        problems += refused
        problems += [
            Problem(ex.line, f"too long: {n} tokens after the chat template, max {max_seq_len}")
            for ex, n in zip(dataset.examples, lengths, strict=True)
            if n > max_seq_len
        ]
    problems.sort(key=lambda p: -1 if p.line is None else p.line)
    summary = summarize(dataset, lengths=lengths, problems=len(problems))
    summary["tokenizer"] = str(tokenizer_dir) if tokenizer_dir is not None else None
    summary["max_seq_len"] = max_seq_len
    summary["length_check"] = "done" if lengths is not None else "skipped: no tokenizer"
    return Report(dataset, problems, summary)


def duplicate_problems(examples: Iterable[Example]) -> list[Problem]:
    """One problem per repeat, on the later line, naming the first."""
    first: dict[str, int] = {}
    problems = []
    for example in examples:
        seen = first.setdefault(example_key(example), example.line)
        if seen != example.line:
            problems.append(Problem(example.line, f"duplicate of line {seen}"))
    return problems


def overlap_problems(train: Dataset, val: Dataset) -> list[Problem]:
    """The validation file's own problems (file-level here, naming its lines), then every
    training example that is also in it."""
    problems = [Problem(None, f"validation file {val.path}: {p}") for p in val.problems]
    val_lines: dict[str, list[int]] = {}
    for example in val.examples:
        val_lines.setdefault(example_key(example), []).append(example.line)
    for example in train.examples:
        lines = val_lines.get(example_key(example))
        if lines:
            where = ", ".join(map(str, lines))
            label = "line" if len(lines) == 1 else "lines"
            problems.append(Problem(example.line, f"also in {val.path} at {label} {where}"))
    return problems


def load_tokenizer(tokenizer_dir: Path) -> Any:
    """The model folder's tokenizer, which must carry a chat template."""
    if not tokenizer_dir.is_dir():
        raise ValueError(f"model folder not found: {tokenizer_dir}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... here
        raise ValueError(f"cannot load a tokenizer from {tokenizer_dir}: {e}") from e
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer in {tokenizer_dir} has no chat template")
    return tokenizer


def token_counts(examples: Sequence[Example], tokenizer: Any) -> tuple[list[int], list[Problem]]:
    """Tokens of each example after the chat template (a preference example: its longer side),
    and a problem for each example the template refuses (counted as 0 tokens)."""
    counts, problems = [], []
    for example in examples:
        if isinstance(example, ChatExample):
            sequences = [example.messages]
        else:
            sequences = [example.prompt + example.chosen, example.prompt + example.rejected]
        try:
            counts.append(max(_template_length(tokenizer, s) for s in sequences))
        except Exception as e:  # jinja2's TemplateError, or whatever the template raises
            counts.append(0)
            problems.append(Problem(example.line, f"the chat template refused it: {e}"))
    return counts, problems


def _template_length(tokenizer: Any, messages: Sequence[Message]) -> int:
    chat = [{"role": m.role, "content": m.content} for m in messages]
    ids = tokenizer.apply_chat_template(chat, tokenize=True)
    # transformers 5 returns a BatchEncoding; older releases a plain list of ids.
    return len(ids if isinstance(ids, list) else ids["input_ids"])


def summarize(dataset: Dataset, *, lengths: Sequence[int] | None, problems: int) -> dict[str, Any]:
    """Counts over the examples without problems. Turns: messages other than system ones."""
    turns = [_turns(example) for example in dataset.examples]
    with_system = sum(_has_system(example) for example in dataset.examples)
    n = len(dataset.examples)
    summary: dict[str, Any] = {
        "path": str(dataset.path),
        "sha256": dataset.sha256,
        "kind": dataset.kind,
        "examples": n,
        "problems": problems,
        "turns": {"mean": round(sum(turns) / n, 3) if n else 0.0, "max": max(turns, default=0)},
        "system_share": round(with_system / n, 4) if n else 0.0,
        "tokens_total": None,
        "tokens": None,
    }
    if lengths is not None:
        ordered = sorted(lengths)
        summary["tokens_total"] = sum(ordered)
        summary["tokens"] = {f"p{p}": percentile(ordered, p) for p in (50, 90, 99)} | {
            "max": ordered[-1] if ordered else 0
        }
    return summary


def percentile(ordered: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of sorted values (0 for none)."""
    if not ordered:
        return 0
    return ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1]


def _turns(example: Example) -> int:
    messages = (
        example.messages if isinstance(example, ChatExample) else example.prompt + example.chosen
    )
    return sum(m.role != "system" for m in messages)


def _has_system(example: Example) -> bool:
    messages = example.messages if isinstance(example, ChatExample) else example.prompt
    return any(m.role == "system" for m in messages)


def split(
    path: Path, *, val_fraction: float, seed: int, out_dir: Path | None = None
) -> tuple[Path, Path]:
    """Write NAME.train.jsonl and NAME.val.jsonl (the input's lines, verbatim, in file order)
    next to the input or into `out_dir`; return their paths.

    The same file and seed give byte-identical files. Duplicates (equal `example_key`) stay
    on one side; each side gets at least one example. A file with problems is refused
    (DatasetError, a ValueError, listing every problem)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    path = Path(path)
    dataset = read_dataset(path)
    if dataset.problems:
        raise DatasetError(path, dataset.problems)
    groups: dict[str, list[int]] = {}  # example_key -> its lines
    for example in dataset.examples:
        groups.setdefault(example_key(example), []).append(example.line)
    if len(groups) < 2:
        raise ValueError(f"{path}: {len(groups)} distinct example(s); a split needs at least 2")
    val_lines = {line for key in _val_groups(groups, val_fraction, seed) for line in groups[key]}
    lines = file_lines(path.read_bytes().decode("utf-8-sig"))
    name = path.name.removesuffix(".jsonl") if path.suffix == ".jsonl" else path.stem
    directory = Path(out_dir) if out_dir is not None else path.parent
    directory.mkdir(parents=True, exist_ok=True)
    outputs = (directory / f"{name}.train.jsonl", directory / f"{name}.val.jsonl")
    for output, to_val in zip(outputs, (False, True), strict=True):
        chosen = [ex.line for ex in dataset.examples if (ex.line in val_lines) == to_val]
        output.write_bytes("".join(lines[n - 1] + "\n" for n in chosen).encode())
    return outputs


def _val_groups(groups: dict[str, list[int]], val_fraction: float, seed: int) -> set[str]:
    """Groups for the validation side: about `val_fraction` of the examples, in an order fixed
    by seed and content alone (a hash, not a PRNG whose stream could change between Pythons)."""
    total = sum(len(lines) for lines in groups.values())
    target = min(max(math.floor(val_fraction * total + 0.5), 1), total - 1)
    order = sorted(groups, key=lambda key: hashlib.sha256(f"{seed}:{key}".encode()).digest())
    chosen: set[str] = set()
    count = 0
    for key in order:
        if count + len(groups[key]) <= target:
            chosen.add(key)
            count += len(groups[key])
    if not chosen:  # every group is larger than the target: the smallest one goes
        chosen.add(min(order, key=lambda key: len(groups[key])))
    return chosen


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _or(words: Sequence[str]) -> str:
    return ", ".join(words[:-1]) + f" or {words[-1]}"
