"""The loss on the CPU: `loraplex train` computes it with the model's own LM head instead of TRL's
chunked one (trainer.sft.PLAIN_HEAD_MAX_LOGITS says why), and the two agree: the same loss and
the same LoRA gradients on a real batch of the embedded model, with assistant-only labels and
padding-free rows. Past the logits bound, and wherever the head is not on the CPU, TRL's head is
used. One forward and backward per head, no training."""

from __future__ import annotations

from pathlib import Path

import pytest

import trainer.sft as sft
from tests.support.sft_trainer import built_trainer
from trainer.sft import IGNORE_INDEX

EXAMPLES = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> dict:
    return built_trainer(tmp_path_factory.mktemp("lm-head"), embedded_model_dir,
                         examples=EXAMPLES, batch_size=EXAMPLES, max_seq_len=512)  # fmt: skip


def loss_and_grads(trainer, batch: dict, items: object = None) -> tuple[float, dict]:
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=items)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
             if p.requires_grad}  # fmt: skip
    trainer.model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def test_the_batch_is_padding_free_with_assistant_only_labels(built: dict) -> None:
    batch = built["batch"]
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    labels = batch["labels"][0]
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()


@pytest.mark.parametrize("accumulated", [False, True], ids=["one-batch", "accumulation"])
def test_the_cpu_uses_the_plain_head_and_it_agrees_with_trls(
    built: dict, monkeypatch: pytest.MonkeyPatch, accumulated: bool
) -> None:
    import torch
    import trl.trainer.utils as trl_utils

    trainer, batch = built["trainer"], built["batch"]
    # Under gradient accumulation the Trainer divides by the tokens of all the micro-batches.
    items = torch.tensor(3 * int((batch["labels"] != IGNORE_INDEX).sum())) if accumulated else None
    chunked_calls = []
    original = trl_utils._ChunkedLogProbFunction.apply

    def counting(*args):
        chunked_calls.append(1)
        return original(*args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting)
    plain_loss, plain_grads = loss_and_grads(trainer, batch, items)
    assert chunked_calls == []  # the model's own head computed it
    monkeypatch.setattr(sft, "PLAIN_HEAD_MAX_LOGITS", 0)  # over the bound: TRL's head
    chunked_loss, chunked_grads = loss_and_grads(trainer, batch, items)
    assert chunked_calls, "TRL's chunked head was not used past the bound"

    assert plain_loss == pytest.approx(chunked_loss, rel=1e-5)
    assert plain_grads.keys() == chunked_grads.keys() and plain_grads
    for name, grad in plain_grads.items():  # fp32 sums in another order: compare whole tensors
        theirs = chunked_grads[name]
        scale = float(theirs.norm())
        if scale == 0.0:  # lora_A's gradient while lora_B is still zero
            assert float(grad.norm()) == 0.0, name
            continue
        assert float((grad - theirs).norm()) / scale < 1e-3, name


def test_the_plain_head_logs_trls_token_accuracy(built: dict) -> None:
    trainer, batch = built["trainer"], built["batch"]
    trainer._metrics["train"].clear()
    loss_and_grads(trainer, batch)
    accuracy = trainer._metrics["train"]["mean_token_accuracy"]
    assert len(accuracy) == 1 and 0.0 <= accuracy[0] <= 1.0


def test_the_bound_and_the_device_choose_the_head() -> None:
    import torch

    vocab = 49152
    assert sft.plain_head(torch.zeros(1, 2048, dtype=torch.long), vocab)
    over = sft.PLAIN_HEAD_MAX_LOGITS // vocab + 1
    assert not sft.plain_head(torch.zeros(1, over, dtype=torch.long), vocab)
    assert not sft.plain_head(torch.zeros(1, 8, dtype=torch.long, device="meta"), vocab)
