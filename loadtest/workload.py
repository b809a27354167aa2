"""What each request asks for: prompt, adapter (`model`), output length, user id.

Prompts come from a JSONL file (`{"messages": [...]}` goes to /v1/chat/completions, `{"prompt":
"..."}` to /v1/completions) or from a seeded synthetic generator, drawn at random or replayed in
order. The adapter mix (uniform, weighted, Zipf, round-robin) picks a `model` per request.
Everything is drawn from one seeded RNG, so a seed fixes the whole request sequence; nothing here
knows about HTTP.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHAT = "chat"
COMPLETIONS = "completions"
ROUND_ROBIN = "round-robin"
PROMPT_ORDERS = ("random", "sequential")

# Common English words: roughly one token each for most tokenizers, so `input_len` words is close
# to `input_len` prompt tokens without a tokenizer on the client.
_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an "
    "each she which do their time if will way about many then them write would like so these her "
    "long make thing see him two has look more day could go come did number sound no most people my "
    "over know water than call first who may down side been now find any new work part take get "
    "place made live where after back little only round man year came show every good me give our"
).split()


@dataclass(frozen=True)
class AdapterMix:
    """Share of requests per model name: uniform, `weights:3,1,1`, `zipf:S` (rank r gets 1/r^S),
    or `round-robin`.

    Round-robin gives the models in turn (request i gets model i mod n) instead of drawing them:
    the same shares as uniform without sampling noise, and the assignment `vllm bench serve
    --lora-assignment round-robin` makes, so both tools can send identical request sequences.
    """

    models: tuple[str, ...]
    weights: tuple[float, ...]
    round_robin: bool = False

    @classmethod
    def parse(cls, spec: str, models: list[str]) -> AdapterMix:
        if not models:
            raise ValueError("give at least one --model")
        kind, _, arg = spec.partition(":")
        n = len(models)
        if kind in ("uniform", ROUND_ROBIN) and not arg:
            weights = [1.0] * n
        elif kind == "weights":
            try:
                weights = [float(w) for w in arg.split(",")]
            except ValueError as e:
                raise ValueError(f"--mix weights:W1,W2,... needs numbers, got {arg!r}") from e
            if len(weights) != n:
                raise ValueError(f"--mix weights has {len(weights)} weights for {n} models")
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError("--mix weights must be >= 0 with a positive sum")
        elif kind == "zipf":
            try:
                s = float(arg)
            except ValueError as e:
                raise ValueError(f"--mix zipf:S needs an exponent, got {arg!r}") from e
            if s < 0:
                raise ValueError(f"zipf exponent must be >= 0, got {s}")
            weights = [1.0 / (rank**s) for rank in range(1, n + 1)]
        else:
            raise ValueError(
                f"--mix must be uniform, round-robin, weights:W1,W2,... or zipf:S; got {spec!r}"
            )
        total = sum(weights)
        return cls(
            models=tuple(models),
            weights=tuple(w / total for w in weights),
            round_robin=kind == ROUND_ROBIN,
        )

    def pick(self, index: int, rng: random.Random, cum_weights: list[float]) -> str:
        """The model of request `index`: its turn under round-robin, else a weighted draw."""
        if self.round_robin:
            return self.models[index % len(self.models)]
        return rng.choices(self.models, cum_weights=cum_weights)[0]

    def shares(self) -> dict[str, float]:
        return dict(zip(self.models, self.weights, strict=True))


@dataclass(frozen=True)
class LengthDist:
    """A token count: `128`, `uniform:LO,HI` (inclusive) or `normal:MEAN,STD` (rounded, >= 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str | int) -> LengthDist:
        text = str(spec)
        kind, _, arg = text.partition(":")
        try:
            if not arg:
                value = int(kind)
            else:
                a, b = (float(x) for x in arg.split(","))
        except ValueError as e:
            raise ValueError(
                f"length must be N, uniform:LO,HI or normal:MEAN,STD; got {text!r}"
            ) from e
        if not arg:
            if value < 1:
                raise ValueError(f"length must be >= 1 token, got {value}")
            return cls("fixed", value)
        if kind == "uniform" and 1 <= a <= b:
            return cls("uniform", a, b)
        if kind == "normal" and a >= 1 and b >= 0:
            return cls("normal", a, b)
        raise ValueError(
            f"length must be N, uniform:LO,HI (1 <= LO <= HI) or normal:MEAN,STD; got {text!r}"
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))


@dataclass(frozen=True)
class Prompt:
    """One prompt: chat `messages` or a raw completion `prompt`."""

    endpoint: str
    messages: list[dict[str, Any]] | None = None
    text: str | None = None


@dataclass(frozen=True)
class RequestSpec:
    """Everything needed to send one request; `body` is the JSON minus `stream` settings."""

    index: int
    model: str
    endpoint: str
    body: dict[str, Any] = field(hash=False)
    user: str | None = None
    max_tokens: int = 0


def load_prompts(path: Path) -> list[Prompt]:
    """Read a JSONL prompt file; every bad line is reported at once."""
    prompts, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: not JSON ({e.msg})")
            continue
        if isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            prompts.append(Prompt(CHAT, messages=row["messages"]))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(Prompt(COMPLETIONS, text=row["prompt"]))
        else:
            problems.append(f'line {number}: expected {{"messages": [...]}} or {{"prompt": "..."}}')
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems[:20]))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def synthetic_prompts(
    rng: random.Random, *, count: int, input_len: LengthDist, endpoint: str = CHAT
) -> list[Prompt]:
    """`count` prompts of sampled word counts, built from common words."""
    prompts = []
    for _ in range(count):
        text = " ".join(rng.choices(_WORDS, k=input_len.sample(rng)))
        if endpoint == CHAT:
            prompts.append(Prompt(CHAT, messages=[{"role": "user", "content": text}]))
        else:
            prompts.append(Prompt(COMPLETIONS, text=text))
    return prompts


@dataclass
class Workload:
    """An endless, seeded stream of `RequestSpec`s.

    `prompt_order` "random" draws each request's prompt; "sequential" replays the prompts in
    order, starting again after the last (a prompt file then fixes exactly what is sent, as
    `vllm bench serve --disable-shuffle` does with its dataset).
    """

    prompts: list[Prompt]
    mix: AdapterMix
    output_len: LengthDist
    seed: int = 0
    users: int = 0
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    prompt_order: str = "random"

    def __post_init__(self) -> None:
        if self.prompt_order not in PROMPT_ORDERS:
            raise ValueError(
                f"prompt order must be one of {', '.join(PROMPT_ORDERS)}, got {self.prompt_order!r}"
            )
        self._rng = random.Random(self.seed)
        self._cum = _cumulative(self.mix.weights)
        self._next = 0

    def next_spec(self) -> RequestSpec:
        rng, index = self._rng, self._next
        self._next += 1
        model = self.mix.pick(index, rng, self._cum)
        if self.prompt_order == "sequential":
            prompt = self.prompts[index % len(self.prompts)]
        else:
            prompt = self.prompts[rng.randrange(len(self.prompts))]
        max_tokens = self.output_len.sample(rng)
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens}
        if prompt.endpoint == CHAT:
            body["messages"] = prompt.messages
        else:
            body["prompt"] = prompt.text
        if self.ignore_eos:
            body["ignore_eos"] = True
        user = f"user-{rng.randrange(self.users)}" if self.users else None
        if user is not None:
            body["user"] = user
        body.update(self.extra_body)
        return RequestSpec(index, model, prompt.endpoint, body, user=user, max_tokens=max_tokens)


def _cumulative(weights: tuple[float, ...]) -> list[float]:
    out, total = [], 0.0
    for w in weights:
        total += w
        out.append(total)
    return out
