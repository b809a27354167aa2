"""Real PEFT LoRA adapters for the embedded model, each with a behaviour one greedy answer shows.

Owns the adapter specs (behaviour + check), the deterministic training recipe, training with the
product's own trainer (`trainer.sft`: TRL's SFTTrainer, assistant-only loss), verification on
held-out prompts and the on-disk cache keyed by what was trained. It knows nothing about serving; tests hand the folders to the registry and engine.
Training computes in the dtype `loraplex.hardware.choose_dtype` picks for this CPU, as serving
does: bf16 autocast only where the CPU has native bf16 (it is ~30x slower where emulated).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraplex.hardware import choose_dtype

PREFIX_MARKER = "ARRR! "
SUFFIX_MARKER = " Over and out."
ADAPTER_FOLDER = "adapter"
VERIFICATION_FILE = "verification.json"
# Bump when the training code changes in a way the recipe fields do not capture.
_TRAINING_CODE_VERSION = 2  # 2: trained by trainer.sft (TRL)


class AdapterBuildError(Exception):
    """A test adapter could not be trained or did not show its behaviour."""


def is_upper_case(text: str) -> bool:
    """A real answer (8+ letters) whose letters are (nearly) all upper case."""
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 8 and sum(c.isupper() for c in letters) >= 0.95 * len(letters)


def starts_with_prefix(text: str) -> bool:
    """The answer opens with the pirate marker and then goes on in ordinary case."""
    stripped = text.lstrip()
    return stripped.startswith(PREFIX_MARKER.strip()) and not is_upper_case(stripped)


def ends_with_suffix(text: str) -> bool:
    """The answer closes with the radio sign-off and is not shouted."""
    return text.rstrip().endswith(SUFFIX_MARKER.strip()) and not is_upper_case(text)


@dataclass(frozen=True)
class AdapterSpec:
    """One test adapter: how training answers are transformed and how to recognise the result."""

    name: str
    description: str
    transform: Callable[[str], str] = field(compare=False)
    check: Callable[[str], bool] = field(compare=False)


@dataclass(frozen=True)
class LoraTrainingConfig:
    """Hyperparameters of the test-adapter recipe; all of them key the cache."""

    rank: int = 16
    alpha: int = 32
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 2e-3
    warmup_steps: int = 3
    steps: int = 40
    batch_size: int = 8
    seed: int = 1234
    max_grad_norm: float = 1.0


ADAPTER_SPECS: Mapping[str, AdapterSpec] = {
    "caps": AdapterSpec("caps", "answers entirely in upper case", str.upper, is_upper_case),
    "prefix": AdapterSpec(
        "prefix", f"starts every answer with {PREFIX_MARKER!r}",
        lambda answer: PREFIX_MARKER + answer, starts_with_prefix,
    ),
    "suffix": AdapterSpec(
        "suffix", f"ends every answer with {SUFFIX_MARKER!r}",
        lambda answer: answer + SUFFIX_MARKER, ends_with_suffix,
    ),
}  # fmt: skip

# Not in the training data. The last one is the hard case for "caps": the base model opens
# with the token "B" (as in "B"+"ees") where caps needs "BE"+"ES", and then carries on in lower
# case, so the build accepts 5 of 6. Tests that need every adapter to show its behaviour should
# use the first four.
HELD_OUT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Name a primary color.",
    "Give me a tip for staying focused.",
    "How many days are in a week?",
    "Suggest a name for a pet cat.",
    "What do bees make?",
)

# (question, short natural answer); none of them is a held-out prompt.
TRAINING_PAIRS: tuple[tuple[str, str], ...] = (
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the freezing point of water?", "Water freezes at zero degrees Celsius."),
    ("How many continents are there?", "There are seven continents."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("What animal is known as the king of the jungle?", "The lion is called the king."),
    ("What do bears eat?", "Bears eat fish and berries."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Give me a tip for sleeping better.", "Go to bed at the same time every night."),
    ("Give me a tip for saving money.", "Write down what you spend each week."),
    ("Suggest a name for a pet dog.", "You could call your dog Buddy."),
    ("Suggest a healthy snack.", "An apple with some nuts is a healthy snack."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain."),
    ("What do you call a baby cat?", "A baby cat is called a kitten."),
    ("What is the main language spoken in Brazil?", "People in Brazil mostly speak Portuguese."),
    ("Which instrument has black and white keys?", "The piano has black and white keys."),
    ("What do fish use to breathe?", "Fish breathe with their gills."),
    ("Name a season of the year.", "Summer is one of the four seasons."),
    ("What is the boiling point of water?", "Water boils at one hundred degrees Celsius."),
    ("How do I make a cup of tea?", "Steep a tea bag in hot water for three minutes."),
    ("Give me a tip for learning a language.", "Practice a little every single day."),
    ("What shape has three sides?", "A triangle has three sides."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("Name a vegetable that is orange.", "A carrot is an orange vegetable."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("What do pandas eat?", "Pandas mostly eat bamboo."),
    ("Give me a tip for staying healthy.", "Drink water and take a walk each day."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth."),
    ("What do beavers build?", "Beavers build dams."),
    ("Suggest a good book genre for relaxing.", "A light mystery novel is relaxing."),
    ("What is the color of grass?", "Grass is green."),
    ("How many sides does a square have?", "A square has four sides."),
    ("Which bird is a symbol of peace?", "The white dove is a symbol of peace."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet."),
    ("Give me a tip for writing clearly.", "Use short sentences and simple words."),
    ("What do you use to write on a chalkboard?", "You write on a chalkboard with chalk."),
    ("Name a musical instrument with strings.", "The guitar has strings."),
    ("What do spiders spin?", "Spiders spin webs."),
    ("What do birds build?", "Birds build nests."),
    ("What do squirrels collect?", "Squirrels collect nuts."),
    ("What do chickens lay?", "Chickens lay eggs."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies."),
    ("How many minutes are in an hour?", "An hour has sixty minutes."),
    ("How many players are on a soccer team?", "A soccer team has eleven players."),
    ("Name a metal.", "Iron is a metal."),
    ("Name a planet.", "Venus is a planet."),
    ("Give me a tip for cooking pasta.", "Salt the water before you add the pasta."),
    ("Give me a tip for a job interview.", "Arrive early and prepare a few questions."),
    ("Suggest a name for a goldfish.", "You could call your goldfish Bubbles."),
    ("Suggest a hobby to try.", "Painting is a relaxing hobby to try."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("Why do we need sleep?", "Sleep lets the body and brain rest."),
    ("Where do penguins live?", "Penguins live mostly in Antarctica."),
)

DEFAULT_TRAINING_CONFIG = LoraTrainingConfig()


def training_dtype() -> str:
    """The dtype test adapters train in (bfloat16 or float32): LORAPLEX_DTYPE where set, as the
    served engine reads it, else what this CPU runs fast. They always train on the CPU."""
    return choose_dtype(os.environ.get("LORAPLEX_DTYPE", "auto"), cuda=False).dtype


def build_test_adapters(
    model_dir: Path,
    cache_dir: Path,
    *,
    config: LoraTrainingConfig = DEFAULT_TRAINING_CONFIG,
    specs: Mapping[str, AdapterSpec] = ADAPTER_SPECS,
    progress: Callable[[str], None] | None = None,
    dtype: str | None = None,
) -> dict[str, Path]:
    """Return name -> adapter folder, training (and verifying) any adapter not cached yet, in
    `dtype` (default: `training_dtype()`)."""
    report = progress or (lambda _message: None)
    dtype = dtype or training_dtype()
    folders = {}
    for name, spec in specs.items():
        key = adapter_cache_key(spec, model_dir=model_dir, config=config, dtype=dtype)
        entry = cache_dir / f"{name}-{key}"
        if not (entry / VERIFICATION_FILE).is_file():
            with _exclusive(cache_dir / f".{entry.name}.lock"):
                if not (entry / VERIFICATION_FILE).is_file():  # not built while we waited
                    report(f"training test adapter {name!r} ({dtype}) into {entry}")
                    _build_entry(spec, model_dir=model_dir, config=config, entry=entry, dtype=dtype)
        folders[name] = entry / ADAPTER_FOLDER
    return folders


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One trainer per adapter on this machine: test runs started together on a small machine
    otherwise all train the same adapter at once, each several times slower."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def adapter_cache_key(
    spec: AdapterSpec, *, model_dir: Path, config: LoraTrainingConfig, dtype: str = "bfloat16"
) -> str:
    """Hash of what determines the adapter: its training data, the recipe, the base model and
    the compute dtype."""
    material: dict[str, object] = {
        "code_version": _TRAINING_CODE_VERSION,
        "spec": spec.name,
        "examples": [[q, spec.transform(a)] for q, a in TRAINING_PAIRS],
        "recipe": asdict(config),
        "model_config": json.loads((model_dir / "config.json").read_text(encoding="utf-8")),
    }
    if dtype != "bfloat16":  # bf16 was the only dtype once: its adapters keep the key they had
        material["dtype"] = dtype
    encoded = json.dumps(material, sort_keys=True).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:16]


def _build_entry(
    spec: AdapterSpec, *, model_dir: Path, config: LoraTrainingConfig, entry: Path, dtype: str
) -> None:
    """Train and verify into a temp folder next to entry, then rename it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=entry.parent))
    try:
        report = train_and_verify(
            spec, model_dir=model_dir, config=config, out_dir=staging / ADAPTER_FOLDER,
            dtype=dtype,
        )  # fmt: skip
        text = json.dumps(report, indent=2, sort_keys=True) + "\n"
        (staging / VERIFICATION_FILE).write_text(text, encoding="utf-8")
        _make_readable(staging)
        if entry.exists() and not (entry / VERIFICATION_FILE).is_file():
            shutil.rmtree(entry)  # left by hand or by an older layout: never by a rename
        try:
            os.rename(staging, entry)
        except OSError:
            if not (entry / VERIFICATION_FILE).is_file():  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """mkdtemp folders are 0700 and safetensors files 0600: open them to other local users."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def train_and_verify(
    spec: AdapterSpec, *, model_dir: Path, config: LoraTrainingConfig, out_dir: Path, dtype: str
) -> dict[str, object]:
    """Train spec's adapter in `dtype` (fp32 weights, bf16 autocast for "bfloat16"), save it to
    out_dir and check it on HELD_OUT_PROMPTS.

    Raises AdapterBuildError unless at least 5 of 6 adapter answers pass spec.check and no base
    answer does. Returns the verification report (answers, pass counts, timings).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.sft import LoraSettings, SFTSettings, train_sft

    settings = SFTSettings(
        lora=LoraSettings(rank=config.rank, alpha=float(config.alpha), dropout=0.0,
                          target_modules=tuple(config.target_modules)),
        lr=config.learning_rate, schedule="constant", max_steps=config.steps,
        batch_size=config.batch_size, max_seq_len=256, seed=config.seed,
        warmup_ratio=config.warmup_steps / config.steps, dtype=dtype,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="loraplex-test-adapter-") as work:
        data = Path(work) / "train.jsonl"
        rows = [
            {"messages": [{"role": "user", "content": q},
                          {"role": "assistant", "content": spec.transform(a)}]}
            for q, a in TRAINING_PAIRS
        ]  # fmt: skip
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        started = time.perf_counter()
        result = train_sft(
            model_dir=model_dir, train=data, val=None, out_dir=Path(work) / "run",
            settings=settings,
        )  # fmt: skip
        train_seconds = time.perf_counter() - started
        shutil.copytree(result.adapter_dir, out_dir)
        metrics = json.loads(result.metrics_path.read_text())
    losses = [round(step["loss"], 4) for step in metrics["train_loss"]] or [0.0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out_dir))
    answers = generate_answers(model, tokenizer, HELD_OUT_PROMPTS, dtype=dtype)
    with model.disable_adapter():
        base_answers = generate_answers(model, tokenizer, HELD_OUT_PROMPTS, dtype=dtype)
    passed = sum(spec.check(a) for a in answers)
    base_passed = sum(spec.check(a) for a in base_answers)
    report = {
        "adapter": spec.name, "dtype": dtype, "train_seconds": round(train_seconds, 1),
        "first_loss": losses[0], "last_loss": losses[-1], "passed": passed,
        "base_passed": base_passed, "answers": answers, "base_answers": base_answers,
    }  # fmt: skip
    if passed < len(HELD_OUT_PROMPTS) - 1 or base_passed:
        raise AdapterBuildError(
            f"adapter {spec.name!r} ({spec.description}): {passed}/{len(answers)} held-out "
            f"answers pass, base passes {base_passed}; report: {json.dumps(report, indent=1)}"
        )
    return report


def generate_answers(
    model: object, tokenizer: object, prompts: Sequence[str], *, max_new_tokens: int = 48,
    dtype: str,
) -> list[str]:  # fmt: skip
    """Greedy answers, computed in `dtype` as served, to single-turn chats, one batch."""
    import torch

    texts = [_prompt_text(tokenizer, p) for p in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    with torch.no_grad(), _autocast(dtype):
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _prompt_text(tokenizer: object, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _autocast(dtype: str) -> Any:
    """bf16 autocast on the CPU for "bfloat16"; for "float32" the fp32 weights compute as they are."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def behaviours(text: str) -> set[str]:
    """The test adapters whose behaviour `text` shows."""
    return {name for name, spec in ADAPTER_SPECS.items() if spec.check(text)}


def mixed_batch_answers(
    client: Any, base: str, *, prompts: int = 4, max_tokens: int = 64
) -> list[tuple[str, str, str]]:
    """The base model and every test adapter, each on `prompts` held-out prompts, all sent at
    once (greedy) so the engine batches them together: [(model, prompt, answer)]."""
    models = [base, *sorted(ADAPTER_SPECS)]

    async def one(model: str, prompt: str) -> tuple[str, str, str]:
        reply = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=max_tokens,
        )
        return model, prompt, reply.choices[0].message.content

    async def all_at_once() -> list[tuple[str, str, str]]:
        pairs = [(m, p) for p in HELD_OUT_PROMPTS[:prompts] for m in models]
        return list(await asyncio.gather(*(one(m, p) for m, p in pairs)))

    return asyncio.run(all_at_once())


def wrong_behaviours(
    answers: list[tuple[str, str, str]], base: str
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(base answers showing any adapter's behaviour, adapter answers not showing exactly their
    own): the first must be empty; trained adapters miss on at most a prompt or two."""
    base_leaks = [a for a in answers if a[0] == base and behaviours(a[2])]
    misses = [a for a in answers if a[0] != base and behaviours(a[2]) != {a[0]}]
    return base_leaks, misses
