"""DPO takes the pairs as trainer.dpo tokenized them. TRL 1.16's DPOTrainer has no public way to
pass pre-tokenized pairs (it skips its own preparation for vision datasets only), so trainer.dpo
overrides DPOTrainer._prepare_dataset, a private method. These tests fail loudly when TRL
changes what that override relies on, or when TRL starts taking such rows by itself (then the
override should go). No training: the trainer is built, not run.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from tests.support.adapters import PREFIX_MARKER, TRAINING_PAIRS
from trainer.dpo import DPOSettings, _build_trainer, _load_split


def write_pairs(path: Path, pairs: tuple[tuple[str, str], ...]) -> Path:
    rows = [{"prompt": q, "chosen": PREFIX_MARKER + a, "rejected": a} for q, a in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_trl_still_prepares_datasets_through_the_private_method_we_override() -> None:
    from trl import DPOTrainer

    parameters = list(inspect.signature(DPOTrainer._prepare_dataset).parameters)
    assert parameters == ["self", "dataset", "processing_class", "args", "dataset_name"], (
        "TRL changed DPOTrainer._prepare_dataset: check trainer.dpo's override"
    )
    source = inspect.getsource(DPOTrainer.__init__)
    assert "self._prepare_dataset(train_dataset" in source, "TRL no longer prepares through it"
    assert "self._prepare_dataset(eval_dataset" in source


def test_the_trainer_keeps_our_token_ids_and_trl_alone_would_not_take_them(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    settings = DPOSettings(max_steps=1, batch_size=2, max_seq_len=96)
    data = write_pairs(tmp_path / "prefs.jsonl", TRAINING_PAIRS[:4])
    rows, _info = _load_split(data, tokenizer, settings, split="train")
    val, _info = _load_split(data, tokenizer, settings, split="val")
    trainer = _build_trainer(
        model_dir=embedded_model_dir, tokenizer=tokenizer, train_set=rows, val_set=val,
        out_dir=tmp_path / "run", settings=settings, start=None, dtype="float32", progress=None,
    )  # fmt: skip
    assert trainer.train_dataset.to_list() == rows.to_list()
    assert trainer.eval_dataset.to_list() == val.to_list()
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    assert all(r["chosen_ids"][-1] == eos and r["rejected_ids"][-1] == eos for r in rows)
    batch = trainer.data_collator([rows[0], rows[1]])
    first = rows[0]["prompt_ids"] + rows[0]["chosen_ids"]
    assert batch["input_ids"][0][: len(first)].tolist() == first  # the collator takes our ids

    with pytest.raises(Exception):  # noqa: B017 - any failure: TRL cannot take these rows
        DPOTrainer._prepare_dataset(trainer, rows, tokenizer, trainer.args, "train")
