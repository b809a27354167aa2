"""Early stopping (`loraplex train --early-stopping N`): when the validation loss stops
improving the run ends before its max steps, metrics.json and the manifest say so and name the
best evaluation, and adapter/ holds that best checkpoint's weights, not the last step's.

The validation answers contradict the training answers (plain case against upper case) and the
learning rate is high, so the validation loss rises after the first evaluation. Trains ~8 steps;
run under the engine lock.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from tests.support.adapters import TRAINING_PAIRS
from trainer.train_cli import train as train_command

MAX_STEPS, EVAL_EVERY, PATIENCE = 30, 2, 2


def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("train")(train_command)
    app.command("noop")(lambda: None)  # two commands, so `train` stays a subcommand
    return app


def write_chat(path: Path, pairs: list[tuple[str, str]]) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in pairs
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_worsening_validation_loss_stops_the_run_at_its_best_checkpoint(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    from safetensors.torch import load_file

    train = write_chat(tmp_path / "train.jsonl", [(q, a.upper()) for q, a in TRAINING_PAIRS[:16]])
    val = write_chat(tmp_path / "val.jsonl", [(q, a.lower()) for q, a in TRAINING_PAIRS[:8]])
    out = tmp_path / "run"
    args = ["train", "--data", str(train), "--val", str(val), "--name", "stopper",
            "--out", str(out), "--model", str(embedded_model_dir), "--lr", "3e-3",
            "--schedule", "constant", "--max-steps", str(MAX_STEPS), "--batch-size", "4",
            "--max-seq-len", "128", "--eval-every", str(EVAL_EVERY),
            "--early-stopping", str(PATIENCE), "--rank", "8", "--seed", "5", "--json"]  # fmt: skip
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output + str(result.exception)

    metrics = json.loads((out / "metrics.json").read_text())
    evals = [(e["step"], e["loss"]) for e in metrics["eval_loss"]]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert metrics["early_stopped"] is True
    assert metrics["steps"] < MAX_STEPS and metrics["max_steps"] == MAX_STEPS
    # It stopped after PATIENCE evaluations without improvement on the best, not later.
    assert evals[-1][0] == metrics["steps"] == best_step + PATIENCE * EVAL_EVERY
    assert all(loss >= best_loss for _step, loss in evals[-PATIENCE:])
    assert metrics["best_step"] == best_step and metrics["best_val_loss"] == best_loss
    assert metrics["final_val_loss"] == evals[-1][1] > best_loss

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["early_stopped"] is True
    assert manifest["hyperparameters"]["early_stopping_patience"] == PATIENCE
    assert manifest["best_step"] == manifest["adapter_step"] == best_step
    assert manifest["best_checkpoint"] == f"checkpoints/checkpoint-{best_step}"
    assert manifest["steps"] == metrics["steps"]

    checkpoints = out / "checkpoints"
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    best = load_file(checkpoints / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    last = load_file(checkpoints / f"checkpoint-{metrics['steps']}" / "adapter_model.safetensors")
    assert adapter.keys() == best.keys() == last.keys()
    assert all(adapter[k].equal(best[k]) for k in adapter)
    assert any(not adapter[k].equal(last[k]) for k in adapter)
