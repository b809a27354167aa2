"""Packing (`--packing`) keeps examples apart: the batch SFTTrainer builds from packed rows holds
each example whole, with positions that restart per example and no label that crosses into the
next one, and the real model's loss on that batch equals its loss on the examples one by one (so
no token attends to another example's tokens). Data level and one forward pass, no training."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.sft_trainer import built_trainer
from trainer.sft import IGNORE_INDEX

EXAMPLES = 6


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> dict:
    """The rows as trainer.sft encodes them, and the first batch of a packing SFTTrainer."""
    built = built_trainer(tmp_path_factory.mktemp("packing"), embedded_model_dir,
                          examples=EXAMPLES, batch_size=1, max_seq_len=512, packing=True)  # fmt: skip
    return built | {"model": built["trainer"].model}


def segments(batch: dict) -> list[tuple[int, int]]:
    """(start, end) of each packed example, from where the positions restart at 0."""
    positions = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0]
    return list(zip(starts, starts[1:] + [len(positions)], strict=True))


def test_the_packed_row_holds_whole_examples_with_their_own_positions(packed: dict) -> None:
    batch, examples = packed["batch"], packed["examples"]
    assert batch["input_ids"].shape[0] == 1  # every example in one row
    assert "attention_mask" not in batch  # the model derives the per-example mask from positions
    spans = segments(batch)
    assert len(spans) == EXAMPLES
    ids = batch["input_ids"][0].tolist()
    positions = batch["position_ids"][0].tolist()
    pieces = sorted(tuple(ids[a:b]) for a, b in spans)
    assert pieces == sorted(tuple(e["input_ids"]) for e in examples)  # none cut, none merged
    for a, b in spans:
        assert positions[a:b] == list(range(b - a))


def test_no_label_crosses_an_example_boundary(packed: dict) -> None:
    batch, examples = packed["batch"], packed["examples"]
    by_ids = {tuple(e["input_ids"]): e["labels"] for e in examples}
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    for a, b in segments(batch):
        own = by_ids[tuple(ids[a:b])]
        assert (
            labels[a] == IGNORE_INDEX
        )  # the first token is never predicted from the previous example
        assert labels[a:b] == own  # the assistant-only mask travels with its example
        assert own[0] == IGNORE_INDEX  # (it was masked alone too: the prompt comes first)


def test_loss_on_the_packed_batch_equals_the_examples_alone(packed: dict) -> None:
    """Attention is block-diagonal: any token seeing another example would change its logits."""
    import torch
    import torch.nn.functional as F

    model, batch = packed["model"], packed["batch"]
    model.eval()
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "position_ids", "labels")}
        packed_loss = model(**inputs).loss.item()
        total, count = 0.0, 0
        for a, b in segments(batch):
            ids = batch["input_ids"][:, a:b]
            labels = batch["labels"][0, a:b]
            logits = model(input_ids=ids).logits[0]
            shifted = labels[1:]
            total += F.cross_entropy(logits[:-1], shifted, ignore_index=IGNORE_INDEX,
                                     reduction="sum").item()  # fmt: skip
            count += int((shifted != IGNORE_INDEX).sum())
    alone = total / count
    assert packed_loss == pytest.approx(alone, rel=1e-4, abs=1e-5)
    # The same row without per-example positions lets every token see the examples before it.
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    assert abs(leaky - alone) > 1e-3
