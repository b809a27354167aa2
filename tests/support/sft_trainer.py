"""An SFTTrainer as `loraplex train` builds it, on upper-cased answers of the shared training
pairs, without training: for tests that look at its batches and its loss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support.adapters import TRAINING_PAIRS


def built_trainer(root: Path, model_dir: Path, *, examples: int, **settings: Any) -> dict:
    """{"examples": the encoded rows, "trainer": the trainer, "batch": its first batch};
    `settings`: SFTSettings fields besides a rank-4 LoRA without dropout in fp32, seed 1."""
    from transformers import AutoTokenizer

    from trainer.sft import LoraSettings, SFTSettings, _build_trainer, _load_split

    train = root / "train.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a.upper()}]}
        for q, a in TRAINING_PAIRS[:examples]
    ]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = SFTSettings(lora=LoraSettings(rank=4, dropout=0.0), max_steps=1, seed=1,
                         dtype="float32", **settings)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset, _info = _load_split(train, tokenizer, config, split="train")
    trainer = _build_trainer(
        model_dir=model_dir, tokenizer=tokenizer, train_set=dataset, val_set=None,
        out_dir=root / "run", settings=config, dtype="float32", progress=None,
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    return {"examples": list(dataset), "trainer": trainer, "batch": batch}
