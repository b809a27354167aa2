"""Evaluating a registry version against a baseline (the base model or another version).

Generations come from the serving path users get: `loraplex serve` on the user's registry and
artifact store, spoken to over HTTP at temperature 0, so NAME@V resolves exactly as in
production. Validation loss and perplexity (assistant tokens only) are computed by peft +
transformers on the version's fetched adapter folder, because the server returns no prompt
logprobs. Metrics against the reference (the example's last assistant message): exact match,
contains, SQuAD-style token F1 and ROUGE-L F, plus a forgetting check on the shipped
general-knowledge and instruction-following set (trainer/forgetting.jsonl; checked answers, no
model judge). Storing the result on the version is the caller's (registry.evaluations).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import string
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.records import VersionRecord
from registry.refs import parse_ref
from registry.service import Registry
from registry.settings import RegistrySettings
from trainer.data import ChatExample, DatasetError, Message, read_dataset
from trainer.serving import ServeError, chat_completion, serve_child

BASE = "base"  # `--baseline base`: the served base model, no adapter
SERVED_BASE_NAME = "loraplex-eval-base"  # cannot collide with an adapter name (it has no @)
FORGETTING_SET = Path(__file__).with_name("forgetting.jsonl")
GENERATION_METRICS = ("exact_match", "contains", "token_f1", "rouge_l")
CHECK_KINDS = ("contains", "exact", "regex")
_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)


class EvaluationError(Exception):
    """The evaluation could not run as asked (bad data or forgetting file, a bad baseline)."""


class ServingPathError(EvaluationError):
    """`loraplex serve` would not start or did not answer."""


# -- metrics against a reference --------------------------------------------------------------


def normalize(text: str, *, case_sensitive: bool = False) -> str:
    """Punctuation removed, whitespace collapsed and (unless `case_sensitive`) lower-cased."""
    text = "".join(" " if c in _PUNCTUATION else c for c in text)
    return " ".join((text if case_sensitive else text.lower()).split())


def tokens(text: str, *, case_sensitive: bool = False) -> list[str]:
    """SQuAD-style answer tokens: normalised words without the articles a, an, the."""
    normal = normalize(text, case_sensitive=case_sensitive)
    return _ARTICLES.sub(" ", normal).split()


def exact_match(answer: str, reference: str, *, case_sensitive: bool = False) -> float:
    return float(
        normalize(answer, case_sensitive=case_sensitive)
        == normalize(reference, case_sensitive=case_sensitive)
    )


def contains(answer: str, reference: str, *, case_sensitive: bool = False) -> float:
    """1.0 when the normalised reference occurs in the normalised answer on word boundaries."""
    ref = normalize(reference, case_sensitive=case_sensitive)
    ans = normalize(answer, case_sensitive=case_sensitive)
    return float(bool(ref) and f" {ref} " in f" {ans} ")


def token_f1(answer: str, reference: str, *, case_sensitive: bool = False) -> float:
    """Harmonic mean of precision and recall of the answer's tokens (a multiset overlap)."""
    ours = tokens(answer, case_sensitive=case_sensitive)
    theirs = tokens(reference, case_sensitive=case_sensitive)
    if not ours or not theirs:
        return float(ours == theirs)
    common = sum((Counter(ours) & Counter(theirs)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(answer: str, reference: str, *, case_sensitive: bool = False) -> float:
    """ROUGE-L F1: LCS of the normalised word sequences over their lengths."""
    ours = normalize(answer, case_sensitive=case_sensitive).split()
    theirs = normalize(reference, case_sensitive=case_sensitive).split()
    if not ours or not theirs:
        return float(ours == theirs)
    lcs = lcs_length(ours, theirs)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(ours), lcs / len(theirs)
    return 2 * precision * recall / (precision + recall)


METRICS: Mapping[str, Callable[..., float]] = {
    "exact_match": exact_match,
    "contains": contains,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
}


def generation_scores(
    answers: Sequence[str], references: Sequence[str], *, case_sensitive: bool = False
) -> dict[str, float]:
    """Each metric's mean over the examples."""
    pairs = list(zip(answers, references, strict=True))
    return {
        name: sum(f(a, r, case_sensitive=case_sensitive) for a, r in pairs) / max(len(pairs), 1)
        for name, f in METRICS.items()
    }


# -- the forgetting set -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ForgettingItem:
    prompt: str
    kind: str  # contains | exact | regex
    expected: str

    def passes(self, answer: str) -> bool:
        """Case-insensitive: knowledge and instructions are checked, not the answer's style."""
        if self.kind == "regex":
            return re.search(self.expected, answer.strip(), re.IGNORECASE) is not None
        if self.kind == "exact":
            return normalize(answer) == normalize(self.expected)
        return contains(answer, self.expected) == 1.0


def read_forgetting_set(path: Path = FORGETTING_SET) -> list[ForgettingItem]:
    """The items of a forgetting file: {"prompt", "check": {"contains"|"exact"|"regex": str}}."""
    items, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        check = row.get("check") if isinstance(row, dict) else None
        if (
            not isinstance(check, dict)
            or len(check) != 1
            or next(iter(check)) not in CHECK_KINDS
            or not isinstance(row.get("prompt"), str)
        ):
            problems.append(f"line {number}: expected {{'prompt', 'check': {{kind: text}}}}")
            continue
        ((kind, expected),) = check.items()
        if kind == "regex":
            re.compile(expected)
        items.append(ForgettingItem(row["prompt"], kind, str(expected)))
    if problems:
        raise EvaluationError(f"{path}: " + "; ".join(problems))
    return items


def forgetting_report(
    items: Sequence[ForgettingItem], version: Sequence[str], baseline: Sequence[str]
) -> dict[str, Any]:
    """Pass rates of both sides; forgetting = baseline's rate - version's; the items lost and
    gained, each with both answers."""
    rows = [
        {"prompt": i.prompt, "check": {i.kind: i.expected}, "version": a, "baseline": b}
        for i, a, b in zip(items, version, baseline, strict=True)
    ]
    ours = [item.passes(a) for item, a in zip(items, version, strict=True)]
    theirs = [item.passes(a) for item, a in zip(items, baseline, strict=True)]
    n = max(len(items), 1)
    return {
        "items": len(items),
        "version_pass_rate": sum(ours) / n,
        "baseline_pass_rate": sum(theirs) / n,
        "forgetting": (sum(theirs) - sum(ours)) / n,
        "lost": [row for row, a, b in zip(rows, ours, theirs, strict=True) if b and not a],
        "gained": [row for row, a, b in zip(rows, ours, theirs, strict=True) if a and not b],
    }


# -- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EvalConfig:
    max_tokens: int = 128
    samples: int = 5
    forgetting: bool = True
    forgetting_max_tokens: int = 48
    case_sensitive: bool = False
    dtype: str = "auto"
    concurrency: int = 8


@dataclass(frozen=True, slots=True)
class Side:
    """One side of the comparison: its label, what the server is asked for, its adapter."""

    label: str  # NAME@V, or "base"
    served_as: str
    record: VersionRecord | None


def run_evaluation(
    settings: RegistrySettings,
    ref: str,
    *,
    data: Path,
    baseline: str = BASE,
    model_dir: Path,
    config: EvalConfig = EvalConfig(),
    progress: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Evaluate `ref` against `baseline` on `data` (chat JSONL); the result document."""
    started = time.monotonic()
    examples, sha256 = _read_examples(data)
    items = read_forgetting_set() if config.forgetting else []
    with Registry.open(settings) as registry, tempfile.TemporaryDirectory() as scratch:
        version, other = _side(registry, ref), _side(registry, baseline)
        if version.record is None:
            raise EvaluationError("the version to evaluate must be NAME@VERSION, not the base")
        if other.label == version.label:
            raise EvaluationError(f"{version.label} cannot be its own baseline")
        folders = {
            s.label: registry.fetch(s.record, Path(scratch) / str(i)) if s.record else None
            for i, s in enumerate((version, other))
        }
        progress(f"validation loss of {version.label} and {other.label} (peft)")
        losses = validation_losses(model_dir, examples, folders, dtype=config.dtype)
        progress("starting `loraplex serve` on the registry")
        ranks = [s.record.rank for s in (version, other) if s.record is not None]
        answers, served = _generate(
            settings, model_dir, (version, other), examples, items, ranks, config, progress
        )
    document = build_document(
        version=version.label, baseline=other.label, examples=examples, answers=answers,
        losses=losses, items=items, config=config,
    )  # fmt: skip
    return {
        **document,
        "served": served,
        "dataset": {"path": str(data), "sha256": sha256, "examples": len(examples)},
        "config": {**document["config"], "model": str(model_dir)},
        "seconds": round(time.monotonic() - started, 1),
    }


def build_document(
    *,
    version: str,
    baseline: str,
    examples: Sequence[ChatExample],
    answers: Mapping[str, Sequence[str]],
    losses: Mapping[str, Mapping[str, float | None]],
    items: Sequence[ForgettingItem],
    config: EvalConfig,
) -> dict[str, Any]:
    """Metrics of both sides, deltas, forgetting and samples. `answers[label]` holds the
    answers to the examples, then to the forgetting items."""
    n = len(examples)
    references = [e.messages[-1].content for e in examples]
    sides: dict[str, dict[str, Any]] = {}
    for key, label in (("version", version), ("baseline", baseline)):
        scores = generation_scores(
            answers[label][:n], references, case_sensitive=config.case_sensitive
        )
        sides[key] = {**losses[label], **scores}
    forgetting = None
    if items:
        forgetting = forgetting_report(items, answers[version][n:], answers[baseline][n:])
        sides["version"]["forgetting_pass_rate"] = forgetting["version_pass_rate"]
        sides["baseline"]["forgetting_pass_rate"] = forgetting["baseline_pass_rate"]
    deltas = {
        k: v - sides["baseline"][k]
        for k, v in sides["version"].items()
        if v is not None and sides["baseline"].get(k) is not None
    }
    samples = [
        {"prompt": _last_user(e), "reference": r, "version": a, "baseline": b}
        for e, r, a, b in zip(
            examples, references, answers[version][:n], answers[baseline][:n], strict=True
        )
    ][: config.samples]
    return {
        "version": version,
        "baseline": baseline,
        "metrics": sides,
        "deltas": deltas,
        "forgetting": forgetting,
        "samples": samples,
        "config": {
            "max_tokens": config.max_tokens,
            "temperature": 0,
            "case_sensitive": config.case_sensitive,
            "loss": "peft + transformers, assistant tokens only",
            "generations": "loraplex serve",
        },
    }


def _last_user(example: ChatExample) -> str:
    users = [m.content for m in example.messages[:-1] if m.role == "user"]
    return users[-1] if users else ""


def _read_examples(path: Path) -> tuple[list[ChatExample], str]:
    dataset = read_dataset(path, kind="chat")
    if dataset.problems:
        raise DatasetError(path, dataset.problems)
    examples = [e for e in dataset.examples if isinstance(e, ChatExample)]
    if not examples:
        raise EvaluationError(f"{path}: no chat examples to evaluate")
    return examples, dataset.sha256


def _side(registry: Registry, ref: str) -> Side:
    if ref == BASE:
        return Side(BASE, SERVED_BASE_NAME, None)
    record = registry.store.resolve(parse_ref(ref))
    return Side(record.ref, record.ref, record)


def _generate(
    settings: RegistrySettings,
    model_dir: Path,
    sides: Sequence[Side],
    examples: Sequence[ChatExample],
    items: Sequence[ForgettingItem],
    ranks: Sequence[int],
    config: EvalConfig,
    progress: Callable[[str], None],
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Greedy answers of every side to every example's prompt, then to every forgetting item."""
    conversations = [[_chat_message(m) for m in e.messages[:-1]] for e in examples]
    conversations += [[{"role": "user", "content": item.prompt}] for item in items]
    limits = [config.max_tokens] * len(examples) + [config.forgetting_max_tokens] * len(items)
    answers: dict[str, list[str]] = {}
    served: dict[str, str] = {}
    try:
        with serve_child(
            model_dir, args=["--registry", settings.database_url(), "--artifacts",
                             settings.artifacts_url(), "--served-name", SERVED_BASE_NAME],
            dtype=config.dtype, max_lora_rank=max([16, *ranks]), max_loras=2,
            max_model_len=2048, max_num_seqs=8,
        ) as url, ThreadPoolExecutor(config.concurrency) as pool:  # fmt: skip
            for side in sides:
                progress(f"generating {len(conversations)} answers with {side.label}")
                replies = list(
                    pool.map(
                        lambda c, limit, m=side.served_as: chat_completion(
                            url, m, c, max_tokens=limit
                        ),
                        conversations,
                        limits,
                    )
                )
                answers[side.label] = [r["content"] for r in replies]
                served[side.label] = replies[0]["model"] if replies else side.served_as
    except ServeError as e:
        raise ServingPathError(f"the serving path failed: {e}") from e
    return answers, served


def _chat_message(message: Message) -> dict[str, str]:
    return {"role": message.role, "content": message.content}


# -- validation loss with peft ----------------------------------------------------------------


def assistant_spans(render: Callable[..., str], messages: Sequence[dict[str, str]]) -> list:
    """Character spans of the assistant turns in `render(messages)` (content and end token)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True)
        through = render(messages[: i + 1], add_generation_prompt=False)
        if not through.startswith(before):
            raise EvaluationError("the chat template does not render conversations as prefixes")
        spans.append((len(before), len(through)))
    return spans


def validation_losses(
    model_dir: Path,
    examples: Sequence[ChatExample],
    adapters: Mapping[str, Path | None],
    *,
    dtype: str = "auto",
) -> dict[str, dict[str, float | None]]:
    """label -> {"loss": mean NLL per assistant token, "perplexity": exp(loss)}; a None
    adapter folder means the base model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.hardware import choose_dtype

    chosen = choose_dtype(dtype, cuda=torch.cuda.is_available()).dtype
    torch_dtype = torch.bfloat16 if chosen == "bfloat16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    # peft's own adapter names: labels such as "a.b@2" are not valid module names.
    slots = {label: f"side{i}" for i, label in enumerate(adapters) if adapters[label] is not None}
    for i, (label, slot) in enumerate(slots.items()):
        folder = str(adapters[label])
        if i == 0:
            model = PeftModel.from_pretrained(model, folder, adapter_name=slot)
        else:
            model.load_adapter(folder, adapter_name=slot)
    model.eval()
    batches = [_labelled(tokenizer, e) for e in examples]
    results: dict[str, dict[str, float | None]] = {}
    for label in adapters:
        total, count = 0.0, 0
        for ids, mask in batches:
            with torch.no_grad(), _active(model, slots.get(label)):
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            targets = torch.tensor(ids[1:])
            keep = torch.tensor(mask[1:])
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            total += float(nll[keep].sum())
            count += int(keep.sum())
        loss = total / count if count else None
        results[label] = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)) if loss is not None else None,
        }
    return results


def _labelled(tokenizer: Any, example: ChatExample) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and which of them are assistant tokens."""
    messages = [_chat_message(m) for m in example.messages]

    def render(msgs: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            list(msgs), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    text = render(messages, add_generation_prompt=False)
    weights = [m.weight for m in example.messages if m.role == "assistant"]
    spans = [s for s, w in zip(assistant_spans(render, messages), weights, strict=True) if w != 0]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


@contextlib.contextmanager
def _active(model: Any, label: str | None) -> Iterator[None]:
    """Run `model` with adapter `label`, or with every adapter disabled for None (the base)."""
    if label is None and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
        return
    if label is not None:
        model.set_adapter(label)
    yield
