"""Supervised fine-tuning of a LoRA (or QLoRA) adapter with TRL's SFTTrainer and peft.

Owns the hyperparameters, the assistant-only tokenization (rendered with the model's own chat
template, as the server renders prompts), the trainer wiring (evaluation, early stopping, best
checkpoint, resumable checkpoints) and the run's outputs, written by `trainer.outputs`. Reading
and validating data files is `trainer.data`'s; putting the result into the registry is the
CLI's (`trainer.train_cli.register_result`). torch & co. are imported inside functions only.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraplex.hardware import DTYPES, choose_dtype
from registry.base_model import BaseModel
from trainer import outputs
from trainer.outputs import TrainingError

if TYPE_CHECKING:
    from registry.service import Registry

IGNORE_INDEX = -100  # labels the loss skips (torch's cross_entropy default)
SCHEDULES = ("cosine", "linear", "constant")
METHODS = ("lora", "qlora")
QLORA_UNAVAILABLE = "QLoRA needs bitsandbytes for its 4-bit base"
QUANTIZATION = {"library": "bitsandbytes", "bits": 4, "quant_type": "nf4", "double_quant": True}
# TRL's SFTTrainer scores tokens through its chunked LM head (trl/kernels/chunked_logprob.py), made
# for Triton GPUs: elsewhere it runs as torch ops tile by tile and recomputes the projection in
# backward. On the CPU, at the batch sizes trained there, the model's own head (one matmul to full
# logits) is faster and no larger (bench/README.md, train.py). Past this many logits per batch the
# chunked head's bounded memory is worth its cost, so it is used again.
PLAIN_HEAD_MAX_LOGITS = 1 << 27

Progress = Callable[[dict[str, Any]], None]
__all__ = [
    "LoraSettings",
    "SFTSettings",
    "TrainResult",
    "TrainingError",
    "encode_chat",
    "train_sft",
]


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def problems(self) -> list[str]:
        found = []
        if self.rank < 1:
            found.append(f"rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            found.append(f"alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            found.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(m.strip() for m in self.target_modules):
            found.append("target modules must be a non-empty list of module names")
        return found


@dataclass(frozen=True)
class SFTSettings:
    """Every hyperparameter of a run; recorded in the manifest and checked again on --resume."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    lr: float = 2e-4
    schedule: str = "cosine"
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 1024
    seed: int = 0
    packing: bool = False
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    warmup_ratio: float = 0.03
    eval_every: int | None = None  # steps; default once per epoch
    early_stopping_patience: int | None = None  # evaluations without improvement
    save_every: int | None = None  # steps; default at every evaluation (else once per epoch)
    method: str = "lora"
    dtype: str = "auto"
    start: str | None = None  # NAME@V continued (its own LoRA shape), None: a fresh LoRA

    def __post_init__(self) -> None:
        problems = self.lora.problems() + self._own_problems()
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))

    def _own_problems(self) -> list[str]:
        found = run_problems(self, optional={"early stopping": self.early_stopping_patience})
        if self.method not in METHODS:
            found.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        return found

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora"]["target_modules"] = list(self.lora.target_modules)
        return data


def run_problems(settings: Any, *, optional: dict[str, int | None] | None = None) -> list[str]:
    """The checks every training method's settings share (SFT here, DPO in trainer.dpo): sizes,
    step counts, learning rate and schedule, length, warmup, dtype, checkpoint cadence."""
    found = []
    positive = {"batch size": settings.batch_size, "gradient accumulation": settings.grad_accum}
    steps = {"max steps": settings.max_steps, "eval every": settings.eval_every,
             "save every": settings.save_every, **(optional or {})}  # fmt: skip
    for label, value in positive.items():
        if value < 1:
            found.append(f"{label} must be at least 1, got {value}")
    for label, value in steps.items():
        if value is not None and value < 1:
            found.append(f"{label} must be at least 1 when given, got {value}")
    if not settings.lr > 0:
        found.append(f"learning rate must be positive, got {settings.lr}")
    if settings.schedule not in SCHEDULES:
        found.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {settings.schedule!r}")
    if settings.max_steps is None and not settings.epochs > 0:
        found.append(f"epochs must be positive, got {settings.epochs}")
    if settings.max_seq_len < 8:
        found.append(f"max sequence length must be at least 8, got {settings.max_seq_len}")
    if not 0 <= settings.warmup_ratio < 1:
        found.append(f"warmup ratio must be in [0, 1), got {settings.warmup_ratio}")
    if settings.dtype not in DTYPES:
        found.append(f"dtype must be one of {', '.join(DTYPES)}, got {settings.dtype!r}")
    every = settings.eval_every or 0
    if settings.save_every and every and settings.save_every % every:
        found.append(
            f"save every ({settings.save_every}) must be a multiple of eval every ({every}), "
            "so that the best checkpoint is kept"
        )
    return found


STARTING_ADAPTER = "from"  # the fetched NAME@V inside the run folder
_LINEAGE_KEYS = ("format", "method", "base_model", "created_at", "steps", "best_val_loss",
                 "final_val_loss", "from")  # fmt: skip


@dataclass(frozen=True)
class StartingAdapter:
    """A registry version a run continues (SFT or DPO): where it was fetched to and what the manifest records."""

    ref: str  # NAME@NUMBER
    adapter_dir: Path
    sha256: str
    lora: LoraSettings
    lineage: dict[str, Any]  # a summary of the version's own lineage

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "sha256": self.sha256, "lineage": self.lineage}


def fetch_starting_adapter(registry: Registry, ref: str, run_dir: Path) -> StartingAdapter:
    """Resolve `ref` (NAME@V, or NAME@alias: recorded as the version it named) and fetch it into
    run_dir/from (kept when it is already there, so a resumed run starts from the same bytes).
    Registry errors propagate (RegistryUserError for an unknown name or version)."""
    version = registry.store.resolve(ref)
    folder = registry.fetch(version, Path(run_dir) / STARTING_ADAPTER)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    lora = LoraSettings(
        rank=int(config["r"]), alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=tuple(sorted(config["target_modules"])),
    )  # fmt: skip
    lineage = dict(version.lineage)
    summary = {key: lineage[key] for key in _LINEAGE_KEYS if key in lineage}
    summary["datasets"] = {
        split: info.get("sha256") for split, info in (lineage.get("datasets") or {}).items()
    }
    summary |= {"created_by": version.created_by, "registered_at": version.created_at.isoformat()}
    return StartingAdapter(version.ref, folder, version.sha256, lora, summary)


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics_path: Path
    plot_path: Path
    manifest_path: Path
    manifest: dict[str, Any]
    best_val_loss: float | None
    final_val_loss: float | None


@dataclass(frozen=True)
class Encoded:
    """One tokenized conversation: `labels` is IGNORE_INDEX except on trained assistant tokens."""

    input_ids: list[int]
    labels: list[int]


def encode_chat(tokenizer: Any, messages: Sequence[Any]) -> Encoded:
    """Tokenize a conversation as the model's chat template renders it; train only on the
    assistant messages whose weight is not 0, each with its end-of-turn token (so the adapter
    learns to stop) but not the whitespace the template puts after it.

    `messages` are trainer.data Messages (role, content, weight). Raises ValueError where the
    template does not render a conversation's beginning as a prefix of the whole.
    """
    chat = [{"role": m.role, "content": m.content} for m in messages]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, message in enumerate(messages):
        if message.role != "assistant" or message.weight == 0:
            continue
        prompt = tokenizer.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(chat[: i + 1], tokenize=False)
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise ValueError(f"the chat template does not render message {i + 1} as a prefix")
        end = turn.rfind(eos) if eos else -1
        spans.append((len(prompt), end + len(eos) if end >= len(prompt) else len(turn.rstrip())))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for token, (start, _end) in zip(encoding.input_ids, encoding.offset_mapping, strict=True)
    ]
    return Encoded(input_ids=list(encoding.input_ids), labels=labels)


def check_method_available(method: str) -> None:
    """QLoRA's 4-bit base needs bitsandbytes (on a CUDA GPU or, slower, on the CPU): where it
    is missing or fails to import, say so before any work is done."""
    if method != "qlora":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingError(f"{QLORA_UNAVAILABLE} (not installed); use --method lora")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # a broken install or a missing native library: any error
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise TrainingError(
            f"{QLORA_UNAVAILABLE} (it fails to import: {reason}); use --method lora"
        ) from e


def train_sft(
    *,
    model_dir: Path,
    train: Path,
    val: Path | None,
    out_dir: Path,
    settings: SFTSettings,
    resume: bool = False,
    progress: Progress | None = None,
    base: BaseModel | None = None,
    start: StartingAdapter | None = None,
) -> TrainResult:
    """Train an adapter on `train` (chat JSONL), evaluating on `val`, into `out_dir`.

    From `start` (fetched by fetch_starting_adapter: its weights are the trainable LoRA's
    starting point, its shape the run's) when given, else a fresh LoRA. `base` names the base
    model as the registry will (default: from the folder). With `resume`, continue from the
    newest checkpoint in out_dir/checkpoints. Raises TrainingError for data or settings that
    cannot train (nothing is written but the run record, the fetched version and checkpoints).
    """
    if (start is None) != (settings.start is None):
        raise TrainingError("settings.start and the starting adapter must be given together")
    if start is not None and start.lora != settings.lora:
        raise TrainingError(
            f"--from {start.ref} is a rank-{start.lora.rank} adapter of "
            f"{', '.join(start.lora.target_modules)} (alpha {start.lora.alpha:g}): "
            "the settings must describe that adapter"
        )
    check_method_available(settings.method)
    import torch
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_set, train_info = _load_split(train, tokenizer, settings, split="train")
    val_set, val_info = _load_split(val, tokenizer, settings, split="val") if val else (None, None)
    datasets = {"train": train_info} | ({"val": val_info} if val_info else {})
    identity = (base or outputs.default_base_model(model_dir)).canonical(str(model_dir))
    record = outputs.run_record(settings=settings.to_json(), datasets=datasets, base_model=identity)
    if start is not None:
        record["from"] = start.to_json()
    checkpoint = outputs.prepare_run_dir(out_dir, record, resume=resume)
    choice = choose_dtype(settings.dtype, cuda=torch.cuda.is_available())
    dtype = resolve_dtype(choice.dtype)
    trainer = _build_trainer(
        model_dir=model_dir, tokenizer=tokenizer, train_set=train_set, val_set=val_set,
        out_dir=out_dir, settings=settings, dtype=dtype, progress=progress, start=start,
    )  # fmt: skip
    started = time.perf_counter()
    tokens_before = _tokens_seen_at(checkpoint)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.perf_counter() - started
    adapter_dir = outputs.save_adapter(trainer.model, out_dir)
    summary = outputs.summarize(
        trainer.state, wall_seconds=wall, tokens_before=tokens_before, datasets=datasets
    )
    manifest = outputs.write_outputs(
        out_dir, adapter_dir=adapter_dir, record=record, summary=summary,
        machine=outputs.machine(settings.dtype, dtype=dtype, reason=choice.reason),
        resumed_from_step=outputs.checkpoint_step(checkpoint) if checkpoint else None,
        extra={"from": start.to_json() if start else None,
               "quantization": quantization_record(dtype) if settings.method == "qlora" else None},
    )  # fmt: skip
    return TrainResult(
        adapter_dir=adapter_dir, metrics_path=out_dir / outputs.METRICS,
        plot_path=out_dir / outputs.PLOT, manifest_path=out_dir / outputs.MANIFEST,
        manifest=manifest, best_val_loss=manifest["best_val_loss"],
        final_val_loss=manifest["final_val_loss"],
    )  # fmt: skip


def resolve_dtype(chosen: str) -> str:
    """The core's choice, made concrete: on a GPU "auto" is bf16 where it is supported."""
    if chosen != "auto":
        return chosen
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"


def _load_split(
    path: Path, tokenizer: Any, settings: SFTSettings, *, split: str
) -> tuple[Any, dict[str, Any]]:
    """A datasets.Dataset of input_ids/labels from a chat file, and what the manifest records."""
    from datasets import Dataset as HFDataset

    from trainer.data import read_dataset

    data = read_dataset(Path(path), kind="auto")
    if data.problems:
        listed = "; ".join(str(p) for p in data.problems)
        raise TrainingError(f"{split} data {path} has {len(data.problems)} problem(s): {listed}")
    if data.kind != "chat":
        raise TrainingError(f"{split} data {path} is {data.kind} data; SFT needs chat examples")
    if not data.examples:
        raise TrainingError(f"{split} data {path} has no examples")
    rows, too_long, untrained, bad = [], 0, 0, []
    for example in data.examples:
        try:
            encoded = encode_chat(tokenizer, example.messages)
        except ValueError as e:
            bad.append(f"line {example.line}: {e}")
            continue
        if len(encoded.input_ids) > settings.max_seq_len:
            too_long += 1
        elif all(label == IGNORE_INDEX for label in encoded.labels):
            untrained += 1
        else:
            rows.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
    if bad:
        raise TrainingError(f"{split} data {path} cannot be rendered: {'; '.join(bad)}")
    if not rows:
        raise TrainingError(
            f"no {split} example of {path} can be trained: {too_long} of {len(data.examples)} are "
            f"longer than --max-seq-len {settings.max_seq_len} tokens and {untrained} have no "
            "assistant message with a non-zero weight"
        )
    info = {"path": str(Path(path).resolve()), "sha256": data.sha256,
            "examples": len(data.examples), "used": len(rows),
            "dropped_too_long": too_long, "dropped_no_assistant_tokens": untrained}  # fmt: skip
    return HFDataset.from_list(rows), info


def _build_trainer(
    *, model_dir: Path, tokenizer: Any, train_set: Any, val_set: Any, out_dir: Path,
    settings: SFTSettings, dtype: str, progress: Progress | None,
    start: StartingAdapter | None = None,
) -> Any:  # fmt: skip
    """SFTTrainer on pre-tokenized rows (the labels are used as they are); a fresh LoRA, or
    `start`'s adapter loaded as the trainable one."""
    from datasets.utils.logging import disable_progress_bar
    from peft import LoraConfig
    from transformers import EarlyStoppingCallback, PrinterCallback
    from transformers.utils import logging as transformers_logging
    from trl import SFTConfig, SFTTrainer

    # Progress is reported through `progress` only: no tqdm bars, no printed log dicts.
    disable_progress_bar()
    transformers_logging.disable_progress_bar()

    lora = settings.lora
    peft_config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
        target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
    )  # fmt: skip
    has_val = val_set is not None
    config = SFTConfig(
        output_dir=str(out_dir / outputs.CHECKPOINTS),
        learning_rate=settings.lr, lr_scheduler_type=settings.schedule,
        num_train_epochs=settings.epochs, max_steps=settings.max_steps or -1,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, warmup_steps=settings.warmup_ratio,
        # Rows over max_seq_len were dropped by _load_split; packing fills bins of that size.
        max_length=settings.max_seq_len if settings.packing else None,
        packing=settings.packing, padding_free=True,
        seed=settings.seed,
        data_seed=settings.seed, bf16=dtype == "bfloat16", fp16=False,
        use_cpu=not _cuda(), gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_strategy="steps", logging_steps=1, report_to="none", disable_tqdm=True,
        eval_strategy="steps" if has_val else "no", eval_steps=1, save_strategy="steps",
        save_steps=1, save_total_limit=3, load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss" if has_val else None, greater_is_better=False,
        include_num_input_tokens_seen="all", restore_callback_states_from_checkpoint=True,
        dataloader_num_workers=0, remove_unused_columns=True,
    )  # fmt: skip
    callbacks: list[Any] = [_ProgressCallback.make(progress)]
    if has_val and settings.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(settings.early_stopping_patience))
    model = _load_model(
        model_dir, settings.method, dtype, checkpointing=settings.gradient_checkpointing
    )
    if start is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, start.adapter_dir, is_trainable=True)
        peft_config = None
    trainer = _trainer_class(SFTTrainer)(
        model=model, args=config, train_dataset=train_set, eval_dataset=val_set,
        processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    # Steps per epoch are known only now (packing changes the row count): evaluate at every
    # eval_every steps (default once per epoch); save at every evaluation, so the best one stays.
    per_epoch = max(
        1, math.ceil(len(trainer.train_dataset) / settings.batch_size) // settings.grad_accum
    )
    config.eval_steps = settings.eval_every or per_epoch
    config.save_steps = settings.save_every or config.eval_steps
    return trainer


def _trainer_class(base: type) -> type:
    """SFTTrainer, computing the loss with the model's own LM head where `plain_head` says so."""
    import torch

    class Trainer(base):  # type: ignore[misc, valid-type]
        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:  # fmt: skip
            vocab = self.model.get_output_embeddings().weight.shape[0]
            if (
                return_outputs
                or self.aux_loss_enabled
                or not plain_head(inputs["input_ids"], vocab)
            ):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            # The model's loss: labels shifted by one, IGNORE_INDEX skipped, summed over
            # num_items_in_batch where given (gradient accumulation), as TRL's head computes it.
            outputs = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch)
            with torch.no_grad():  # the token accuracy TRL logs, from the logits at hand
                labels = inputs["labels"][:, 1:]
                valid = labels != IGNORE_INDEX
                correct = (outputs.logits[:, :-1].argmax(-1) == labels) & valid
                count = int(valid.sum())
                accuracy = int(correct.sum()) / count if count else 0.0
            self._metrics[mode]["mean_token_accuracy"].append(accuracy)
            if mode == "train":  # padding-free rows have no attention mask: every token counts
                mask = inputs.get("attention_mask")
                tokens = inputs["input_ids"].numel() if mask is None else int(mask.sum())
                self._total_train_tokens += tokens // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return outputs.loss

    return Trainer


def plain_head(input_ids: Any, vocab: int) -> bool:
    """Whether this batch's loss is computed with the model's own LM head rather than TRL's
    chunked one: on the CPU, while its logits stay under PLAIN_HEAD_MAX_LOGITS."""
    return input_ids.device.type == "cpu" and input_ids.numel() * vocab <= PLAIN_HEAD_MAX_LOGITS


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def quantization_record(dtype: str) -> dict[str, Any]:
    """What the manifest of a QLoRA run records about its base (the adapter is served on the
    full-precision base)."""
    return QUANTIZATION | {"compute_dtype": dtype,
                           "version": outputs.library_versions().get("bitsandbytes")}  # fmt: skip


def _load_model(model_dir: Path, method: str, dtype: str, *, checkpointing: bool = False) -> Any:
    """The frozen base in the chosen dtype (bf16 weights where bf16 is chosen, the LoRA in fp32
    as peft keeps it); a 4-bit NF4 base for QLoRA, on the GPU where there is one, else on the
    CPU (no memory win at 135M: the point is the adapter, served on the full-precision base).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if method != "qlora":
        weights = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization, dtype=compute,
        device_map={"": 0 if _cuda() else "cpu"},
    )  # fmt: skip
    keep_4bit_weights_trainable(model)
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )  # fmt: skip


def keep_4bit_weights_trainable(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; the number
    of 4-bit layers seen.

    bitsandbytes 0.50's Linear4bit.forward, on a CPU with AVX512-BF16 (the layer's
    `support_avx512bf16_for_cpu`, probed at construction), converts its weight in place to a
    packed layout at the first forward in eval mode without grad: exactly what the trainer's
    evaluations (every --eval-every steps, the final one) do. From then on every forward takes
    the fused gemv kernel, which has no autograd: the gradient stops at each 4-bit layer and
    training goes on silently wrong. With the flag off the layer always takes the dequantizing
    path, which trains and evaluates alike. A layer already packed is refused, not guessed at.
    """
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            raise TrainingError("a 4-bit layer was already packed for inference: reload the base")
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def _tokens_seen_at(checkpoint: Path | None) -> int:
    return outputs.checkpoint_state(checkpoint).get("num_input_tokens_seen", 0) if checkpoint else 0


class _ProgressCallback:
    """Forwards the run's progress to `progress` as plain dicts, each with its "event": start;
    train (loss, learning rate, DPO's rewards); eval (eval_loss); checkpoint (its path, once
    saved). The command that trains adds "done" at the end (trainer.train_cli).
    """

    @staticmethod
    def make(progress: Progress | None) -> Any:
        from transformers import TrainerCallback

        report = progress or (lambda _event: None)

        class Forward(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                report({"event": "start", "step": state.global_step, "max_steps": state.max_steps})

            def on_log(
                self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
            ) -> None:
                logs = logs or {}
                event = {"step": state.global_step, "max_steps": state.max_steps,
                         "epoch": state.epoch}  # fmt: skip
                if "eval_loss" in logs:
                    report(event | {"event": "eval", "eval_loss": logs["eval_loss"]}
                           | _accuracy(logs, "eval_accuracy", _EVAL_ACCURACY))  # fmt: skip
                elif "loss" in logs:
                    rewards = {key.removeprefix(_REWARDS): value for key, value in logs.items()
                               if key.startswith(_REWARDS)}  # fmt: skip
                    report(event | {"event": "train", "loss": logs["loss"],
                                    "learning_rate": logs.get("learning_rate")}
                           | _accuracy(logs, "accuracy", _ACCURACY)
                           | ({"rewards": rewards} if rewards else {}))  # fmt: skip

            def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                report({"event": "checkpoint", "step": state.global_step,
                        "max_steps": state.max_steps, "path": str(path.resolve())})  # fmt: skip

        return Forward()


_REWARDS = "rewards/"  # DPOTrainer's logged reward metrics: rewards/chosen, .../margins, ...
# SFTTrainer's logged share of trained tokens predicted right (greedy), in training and in eval.
_ACCURACY, _EVAL_ACCURACY = "mean_token_accuracy", "eval_mean_token_accuracy"


def _accuracy(logs: dict[str, Any], key: str, logged: str) -> dict[str, Any]:
    return {key: logs[logged]} if logs.get(logged) is not None else {}
