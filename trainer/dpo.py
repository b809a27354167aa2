"""Preference tuning (DPO) of a LoRA adapter with TRL's DPOTrainer and peft.

Owns the DPO hyperparameters, the rendering of preference pairs with the model's own chat
template (the prompt as the server renders it, with the generation prompt; each answer up to and
including its end-of-turn token), the starting point (a fresh LoRA on the base, or a registry
version continued) and the trainer wiring. Run folders, resume and outputs are `trainer.outputs`'
and shared with SFT; registering is the CLI's (`trainer.train_cli.register_result`).

The reference model is what TRL makes of a PEFT policy without an explicit `ref_model`: for a
fresh LoRA the reference is the base with the adapter disabled (the same model the fresh adapter
starts as, since LoRA's B starts at zero); for `--from NAME@V` TRL adds a frozen copy of the
loaded adapter named "ref" and computes the reference with it, so the reference is that version
itself, not the bare base. Only the trained adapter ("default") is saved.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraplex.hardware import choose_dtype
from registry.base_model import BaseModel
from trainer import outputs
from trainer.outputs import TrainingError
from trainer.sft import (
    LoraSettings,
    Progress,
    StartingAdapter,
    TrainResult,
    fetch_starting_adapter,
    resolve_dtype,
    run_problems,
)

if TYPE_CHECKING:
    from trainer.data import Message, PreferenceExample

MANIFEST_FORMAT = "loraplex.dpo/1"
TRAINED_ADAPTER = "default"  # peft's name for the adapter being trained
REFERENCE_ADAPTER = "ref"  # the frozen copy TRL adds for a PEFT policy loaded with an adapter

__all__ = [
    "DPOSettings",
    "EncodedPair",
    "StartingAdapter",
    "encode_preference",
    "fetch_starting_adapter",
    "train_dpo",
]


@dataclass(frozen=True)
class DPOSettings:
    """Every hyperparameter of a DPO run; recorded in the manifest and checked on --resume.

    `lora` describes the adapter trained: the flags for a fresh one, the starting version's own
    configuration with `start` (NAME@V).
    """

    lora: LoraSettings = field(default_factory=LoraSettings)
    beta: float = 0.1
    sft_weight: float = 0.0  # weight of a language-model loss on the chosen answers (RPO)
    lr: float = 5e-5
    schedule: str = "cosine"
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4  # preference pairs
    grad_accum: int = 1
    max_seq_len: int = 1024  # prompt + the longer answer; longer pairs are dropped
    seed: int = 0
    warmup_ratio: float = 0.03
    eval_every: int | None = None  # steps; default once per epoch
    save_every: int | None = None  # steps; default at every evaluation (else once per epoch)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    dtype: str = "auto"
    start: str | None = None  # NAME@V continued, None: a fresh LoRA on the base
    method: str = "dpo"

    def __post_init__(self) -> None:
        problems = self.lora.problems() + self._own_problems()
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))

    def _own_problems(self) -> list[str]:
        found = run_problems(self)
        if not self.beta > 0:
            found.append(f"beta must be positive, got {self.beta}")
        if not self.sft_weight >= 0:
            found.append(f"sft weight must be 0 or more, got {self.sft_weight}")
        if self.method != "dpo":
            found.append(f"method must be dpo, got {self.method!r}")
        return found

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora"]["target_modules"] = list(self.lora.target_modules)
        return data


@dataclass(frozen=True)
class EncodedPair:
    """One preference pair as token ids: the prompt, then each answer with its end-of-turn."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def encode_preference(tokenizer: Any, example: PreferenceExample) -> EncodedPair:
    """Render a pair with the model's chat template: the prompt with the generation prompt (as
    served), each answer from there to its end-of-turn token inclusive (not the whitespace after
    it). Raises ValueError where the template does not render the prompt as a prefix."""
    prompt = _chat(example.prompt)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = [_ids(tokenizer, prompt_text)]
    for side in (example.chosen, example.rejected):
        whole = tokenizer.apply_chat_template(prompt + _chat(side), tokenize=False)
        if not whole.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix")
        eos = tokenizer.eos_token or ""
        end = whole.rfind(eos) if eos else -1
        stop = end + len(eos) if end >= len(prompt_text) else len(whole.rstrip())
        ids.append(_ids(tokenizer, whole[len(prompt_text) : stop]))
    return EncodedPair(*ids)


def _chat(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def train_dpo(
    *,
    model_dir: Path,
    train: Path,
    val: Path | None,
    out_dir: Path,
    settings: DPOSettings,
    start: StartingAdapter | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    base: BaseModel | None = None,
) -> TrainResult:
    """DPO-train an adapter on `train` (preference JSONL), evaluating on `val`, into `out_dir`.

    From `start` (fetched by fetch_starting_adapter) when given, else a fresh LoRA. With `resume`,
    continue from the newest checkpoint. Raises TrainingError for data or settings that cannot
    train (nothing is written but the run record, the fetched version and checkpoints).
    """
    if (start is None) != (settings.start is None):
        raise TrainingError("settings.start and the starting adapter must be given together")
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
        out_dir=out_dir, settings=settings, start=start, dtype=dtype, progress=progress,
    )  # fmt: skip
    started = time.perf_counter()
    tokens_before = _tokens_seen_at(checkpoint)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.perf_counter() - started
    if REFERENCE_ADAPTER in trainer.model.peft_config:
        trainer.model.delete_adapter(REFERENCE_ADAPTER)  # the frozen reference is not the result
    adapter_dir = outputs.save_adapter(trainer.model, out_dir)
    summary = outputs.summarize(
        trainer.state, wall_seconds=wall, tokens_before=tokens_before, datasets=datasets
    ) | outputs.summarize_rewards(trainer.state)
    manifest = outputs.write_outputs(
        out_dir, adapter_dir=adapter_dir, record=record, summary=summary,
        machine=outputs.machine(settings.dtype, dtype=dtype, reason=choice.reason),
        resumed_from_step=outputs.checkpoint_step(checkpoint) if checkpoint else None,
        plot=outputs.plot_preference, extra=_manifest_extra(settings, start),
    )  # fmt: skip
    return TrainResult(
        adapter_dir=adapter_dir, metrics_path=out_dir / outputs.METRICS,
        plot_path=out_dir / outputs.PLOT, manifest_path=out_dir / outputs.MANIFEST,
        manifest=manifest, best_val_loss=manifest["best_val_loss"],
        final_val_loss=manifest["final_val_loss"],
    )  # fmt: skip


def _manifest_extra(settings: DPOSettings, start: StartingAdapter | None) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "beta": settings.beta,
        "from": start.to_json() if start else None,
        "reference": f"{start.ref} (frozen)" if start else "base model (adapter disabled)",
    }


def _load_split(
    path: Path, tokenizer: Any, settings: DPOSettings, *, split: str
) -> tuple[Any, dict[str, Any]]:
    """A datasets.Dataset of prompt/chosen/rejected ids from a preference file, and what the
    manifest records."""
    from datasets import Dataset as HFDataset

    from trainer.data import read_dataset

    data = read_dataset(Path(path), kind="preference")
    if data.problems:
        listed = "; ".join(str(p) for p in data.problems)
        raise TrainingError(f"{split} data {path} has {len(data.problems)} problem(s): {listed}")
    if not data.examples:
        raise TrainingError(f"{split} data {path} has no examples")
    rows, too_long, bad = [], 0, []
    for example in data.examples:
        try:
            pair = encode_preference(tokenizer, example)
        except ValueError as e:
            bad.append(f"line {example.line}: {e}")
            continue
        if len(pair) > settings.max_seq_len:
            too_long += 1
        else:
            rows.append(asdict(pair))
    if bad:
        raise TrainingError(f"{split} data {path} cannot be rendered: {'; '.join(bad)}")
    if not rows:
        raise TrainingError(
            f"no {split} pair of {path} can be trained: all {too_long} are longer than "
            f"--max-seq-len {settings.max_seq_len} tokens (prompt + the longer answer)"
        )
    info = {"path": str(Path(path).resolve()), "sha256": data.sha256,
            "examples": len(data.examples), "used": len(rows),
            "dropped_too_long": too_long, "dropped_no_assistant_tokens": 0}  # fmt: skip
    return HFDataset.from_list(rows), info


def _build_trainer(
    *, model_dir: Path, tokenizer: Any, train_set: Any, val_set: Any, out_dir: Path,
    settings: DPOSettings, start: StartingAdapter | None, dtype: str, progress: Progress | None,
) -> Any:  # fmt: skip
    """DPOTrainer on pre-tokenized pairs, with a PEFT policy and no separate reference model."""
    import math

    from datasets.utils.logging import disable_progress_bar
    from transformers import PrinterCallback
    from transformers.utils import logging as transformers_logging
    from trl import DPOConfig, DPOTrainer

    from trainer.sft import _cuda, _ProgressCallback

    disable_progress_bar()
    transformers_logging.disable_progress_bar()
    has_val = val_set is not None
    config = DPOConfig(
        output_dir=str(out_dir / outputs.CHECKPOINTS), beta=settings.beta,
        **_loss(settings.sft_weight),
        learning_rate=settings.lr, lr_scheduler_type=settings.schedule,
        num_train_epochs=settings.epochs, max_steps=settings.max_steps or -1,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, warmup_steps=settings.warmup_ratio,
        max_length=None, seed=settings.seed, data_seed=settings.seed,
        bf16=dtype == "bfloat16", fp16=False, use_cpu=not _cuda(),
        gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_strategy="steps", logging_steps=1,
        report_to="none", disable_tqdm=True, eval_strategy="steps" if has_val else "no",
        eval_steps=1, save_strategy="steps", save_steps=1, save_total_limit=3,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        restore_callback_states_from_checkpoint=True,
    )  # fmt: skip

    class PreTokenizedDPOTrainer(DPOTrainer):
        """Takes the pairs as encode_preference tokenized them. TRL would render them again
        with the template and keep the whitespace after each answer's end-of-turn."""

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

    model, peft_config = _policy(model_dir, settings, start, dtype)
    trainer = PreTokenizedDPOTrainer(
        model=model, args=config, train_dataset=train_set, eval_dataset=val_set,
        processing_class=tokenizer, peft_config=peft_config,
        callbacks=[_ProgressCallback.make(progress)],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    per_epoch = max(1, math.ceil(len(train_set) / settings.batch_size) // settings.grad_accum)
    config.eval_steps = settings.eval_every or per_epoch
    config.save_steps = settings.save_every or config.eval_steps
    return trainer


def _loss(sft_weight: float) -> dict[str, Any]:
    """DPO's sigmoid loss, plus (RPO) the chosen answers' own language-model loss: without it a
    pair that differs in one phrase teaches the phrase everywhere and the end-of-turn token is
    lost (answers that repeat it and never stop; the serving gate catches them)."""
    if not sft_weight:
        return {"loss_type": ["sigmoid"]}
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]}


def _policy(
    model_dir: Path, settings: DPOSettings, start: StartingAdapter | None, dtype: str
) -> tuple[Any, Any]:
    """The model to train and, for a fresh adapter, the LoraConfig TRL applies to it."""
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.sft import _cuda

    weights = torch.bfloat16 if dtype == "bfloat16" and _cuda() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights)
    if start is not None:
        policy = PeftModel.from_pretrained(
            model, start.adapter_dir, adapter_name=TRAINED_ADAPTER, is_trainable=True
        )
        return policy, None
    lora = settings.lora
    return model, LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
        target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
    )  # fmt: skip


def _tokens_seen_at(checkpoint: Path | None) -> int:
    return outputs.checkpoint_state(checkpoint).get("num_input_tokens_seen", 0) if checkpoint else 0


def reward_trend(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """First and last logged reward margin and accuracy, for a one-line report."""
    rewards = metrics.get("rewards") or []
    first, last = (rewards[0], rewards[-1]) if rewards else ({}, {})
    return {"first_margin": first.get("margins"), "last_margin": last.get("margins"),
            "first_accuracy": first.get("accuracies"),
            "last_accuracy": last.get("accuracies")}  # fmt: skip
