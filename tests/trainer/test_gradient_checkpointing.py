"""`--gradient-checkpointing`: the layers' activations are recomputed in backward (the model's
layers go through torch's checkpoint), and the training is the same training: equal losses step
by step with and without it. Two runs of two steps each on the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.adapters import TRAINING_PAIRS
from trainer.sft import LoraSettings, SFTSettings, train_sft


def rows(path: Path) -> Path:
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in TRAINING_PAIRS[:8]]  # fmt: skip
    path.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    return path


def run(tmp: Path, model_dir: Path, *, checkpointing: bool) -> dict:
    settings = SFTSettings(lora=LoraSettings(rank=4, dropout=0.0), max_steps=2, batch_size=4,
                           max_seq_len=256, seed=1, dtype="float32",
                           gradient_checkpointing=checkpointing)  # fmt: skip
    result = train_sft(model_dir=model_dir, train=rows(tmp / "train.jsonl"), val=None,
                       out_dir=tmp / "run", settings=settings)  # fmt: skip
    return {"losses": [e["loss"] for e in json.loads(result.metrics_path.read_text())["train_loss"]],
            "manifest": result.manifest}  # fmt: skip


def test_checkpointing_recomputes_the_layers_and_trains_the_same(
    tmp_path: Path, embedded_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.modeling_utils as modeling

    calls = []
    original = modeling.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling, "checkpoint", counted)  # what enabling binds the layers to
    (tmp_path / "plain").mkdir()
    (tmp_path / "checkpointed").mkdir()
    plain = run(tmp_path / "plain", embedded_model_dir, checkpointing=False)
    assert calls == []
    checkpointed = run(tmp_path / "checkpointed", embedded_model_dir, checkpointing=True)
    assert len(calls) >= 2 * 30  # every decoder layer, at every step's forward
    assert checkpointed["manifest"]["hyperparameters"]["gradient_checkpointing"] is True
    assert plain["manifest"]["hyperparameters"]["gradient_checkpointing"] is False
    assert len(plain["losses"]) == len(checkpointed["losses"]) == 2
    assert checkpointed["losses"] == pytest.approx(plain["losses"], rel=1e-4)
