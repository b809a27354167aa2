"""What a training run leaves in its folder, and the lineage it records.

Layout of a run folder: `run.json` (what the run is: settings, dataset sha256s, base model;
checked again on --resume), `checkpoints/checkpoint-N/` (resumable trainer states),
`adapter/` (the PEFT folder to register), `metrics.json`, `loss.png` and `manifest.json`
(lineage). This module reads and writes those files; it does not train (trainer.sft and
trainer.dpo do).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraplex.hardware import machine_record
from registry.base_model import EMBEDDED_MODEL_FOLDER, BaseModel, load_base_model
from registry.settings import RegistrySettings

RUN_RECORD = "run.json"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
METRICS = "metrics.json"
PLOT = "loss.png"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "loraplex.sft/1"
LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes")
_CHECKPOINT_PREFIX = "checkpoint-"
_TRAINER_STATE = "trainer_state.json"


class TrainingError(Exception):
    """A run that cannot start or cannot finish; the message says why and what to change."""


def default_base_model(model_dir: Path) -> BaseModel:
    """The base model as a registry with default settings names it: the embedded model's
    folder is the registry's default identity, any other folder is named after itself."""
    embedded = model_dir.name == EMBEDDED_MODEL_FOLDER
    identity = RegistrySettings.model_fields["base_model"].default if embedded else model_dir.name
    return load_base_model(identity, model_dir, embedded=embedded)


def run_record(
    *, settings: Mapping[str, Any], datasets: Mapping[str, Mapping[str, Any]], base_model: str
) -> dict[str, Any]:
    """What makes two runs the same run: resuming under a different one is refused."""
    return {
        "settings": dict(settings),
        "datasets": {split: dict(info) for split, info in datasets.items()},
        "base_model": base_model,
    }


def prepare_run_dir(out_dir: Path, record: Mapping[str, Any], *, resume: bool) -> Path | None:
    """Create (or, with `resume`, reopen) the run folder; the checkpoint to resume from."""
    record_path = out_dir / RUN_RECORD
    if not resume:
        if record_path.exists() or newest_checkpoint(out_dir) or (out_dir / ADAPTER).exists():
            raise TrainingError(
                f"{out_dir} already holds a run: pass --resume to continue it, or choose "
                "another --out"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(record_path, record)
        return None
    if not record_path.is_file():
        raise TrainingError(f"nothing to resume in {out_dir}: it has no {RUN_RECORD}")
    earlier = json.loads(record_path.read_text(encoding="utf-8"))
    differences = _differences(earlier, record)
    if differences:
        raise TrainingError(
            f"cannot resume {out_dir} with other inputs: {'; '.join(differences)}; "
            "resume with the same data and settings, or train into another --out"
        )
    return newest_checkpoint(out_dir)


def _differences(earlier: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    found = []
    if earlier.get("settings") != now["settings"]:
        old, new = earlier.get("settings") or {}, now["settings"]
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        found.append(f"settings differ ({', '.join(changed)})")
    old_data = earlier.get("datasets") or {}
    for split in sorted(set(old_data) | set(now["datasets"])):
        old_sha = (old_data.get(split) or {}).get("sha256")
        if old_sha != (now["datasets"].get(split) or {}).get("sha256"):
            found.append(f"the {split} data changed (sha256 was {old_sha})")
    if earlier.get("base_model") != now["base_model"]:
        found.append(f"base model was {earlier.get('base_model')!r}, now {now['base_model']!r}")
    return found


def newest_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step under out_dir/checkpoints, if any."""
    folder = out_dir / CHECKPOINTS
    if not folder.is_dir():
        return None
    complete = [
        path
        for path in folder.glob(f"{_CHECKPOINT_PREFIX}*")
        if path.name.removeprefix(_CHECKPOINT_PREFIX).isdigit()
        and (path / _TRAINER_STATE).is_file()
    ]
    return max(complete, key=checkpoint_step, default=None)


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(_CHECKPOINT_PREFIX))


def checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / _TRAINER_STATE).read_text(encoding="utf-8"))


def save_adapter(model: Any, out_dir: Path) -> Path:
    """Save the PEFT adapter as out_dir/adapter, replacing any earlier one only when complete."""
    final = out_dir / ADAPTER
    staging = out_dir / f".{ADAPTER}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def summarize(
    state: Any,
    *,
    wall_seconds: float,
    tokens_before: int,
    datasets: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """metrics.json's content from the trainer's state (its log spans a resumed run's parts)."""
    # Token accuracy: SFT's share of trained tokens predicted right (greedy); DPO logs none.
    train = [
        {"step": e["step"], "epoch": e.get("epoch"), "loss": e["loss"],
         "learning_rate": e.get("learning_rate"), "accuracy": e.get("mean_token_accuracy")}
        for e in state.log_history if "loss" in e and "step" in e
    ]  # fmt: skip
    evals = [
        {"step": e["step"], "epoch": e.get("epoch"), "loss": e["eval_loss"],
         "accuracy": e.get("eval_mean_token_accuracy")}
        for e in state.log_history
        if "eval_loss" in e
    ]  # fmt: skip
    tokens = int(state.num_input_tokens_seen or 0)
    final_eval = evals[-1] if evals and evals[-1]["step"] == state.global_step else None
    return {
        "train_loss": train,
        "eval_loss": evals,
        "best_val_loss": state.best_metric if evals else None,
        "best_step": state.best_global_step if evals else None,
        "final_val_loss": final_eval["loss"] if final_eval else None,
        "final_train_loss": train[-1]["loss"] if train else None,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs": state.epoch,
        "early_stopped": state.global_step < state.max_steps,
        "tokens_trained": tokens,
        "tokens_per_second": round((tokens - tokens_before) / wall_seconds, 1)
        if wall_seconds > 0
        else None,
        "wall_seconds": round(wall_seconds, 2),
        "dropped_examples": {
            split: {k: info[k] for k in ("dropped_too_long", "dropped_no_assistant_tokens")}
            for split, info in datasets.items()
        },
    }


def machine(requested: str, *, dtype: str, reason: str) -> dict[str, Any]:
    """loraplex.hardware's machine record, with the dtype this run actually computed in."""
    import torch

    cuda = torch.cuda.is_available()
    record = machine_record(requested, cuda=cuda)
    return record | {
        "dtype": dtype,
        "dtype_reason": reason,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def write_outputs(
    out_dir: Path,
    *,
    adapter_dir: Path,
    record: Mapping[str, Any],
    summary: Mapping[str, Any],
    machine: Mapping[str, Any],
    resumed_from_step: int | None,
    plot: Callable[[Mapping[str, Any], Path], None] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write metrics.json, loss.png and manifest.json; return the manifest. `plot` draws
    loss.png (default: plot_losses); `extra` adds or overrides manifest fields (DPO's format,
    beta and starting version)."""
    _write_json(out_dir / METRICS, summary)
    (plot or plot_losses)(summary, out_dir / PLOT)
    settings = record["settings"]
    manifest = {
        "format": MANIFEST_FORMAT,
        "method": settings.get("method", "lora"),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "datasets": record["datasets"],
        "hyperparameters": settings,
        "base_model": record["base_model"],
        "libraries": library_versions(),
        "machine": dict(machine),
        "dtype": machine["dtype"],
        "best_val_loss": summary["best_val_loss"],
        "final_val_loss": summary["final_val_loss"],
        "best_step": summary["best_step"],
        "best_checkpoint": f"{CHECKPOINTS}/{_CHECKPOINT_PREFIX}{summary['best_step']}"
        if summary["best_step"] is not None
        else None,
        "adapter_step": summary["best_step"] or summary["steps"],
        "steps": summary["steps"],
        "early_stopped": summary["early_stopped"],
        "resumed_from_step": resumed_from_step,
    } | dict(extra or {})
    _write_json(out_dir / MANIFEST, manifest)
    return manifest


def plot_losses(summary: Mapping[str, Any], path: Path) -> None:
    """Train loss per logging step and validation loss per evaluation, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        train = summary["train_loss"]
        axes.plot([e["step"] for e in train], [e["loss"] for e in train], label="train")
        evals = summary["eval_loss"]
        if evals:
            steps, losses = [e["step"] for e in evals], [e["loss"] for e in evals]
            axes.plot(steps, losses, marker="o", label="validation")
        if summary["best_step"] is not None:
            axes.axvline(summary["best_step"], color="grey", linestyle=":", label="best")
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title("SFT loss")
        axes.legend()
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)


REWARDS = ("chosen", "rejected", "margins", "accuracies")  # TRL's DPO logs: rewards/<name>


def summarize_rewards(state: Any) -> dict[str, Any]:
    """metrics.json's preference part: DPO's implicit rewards per logging step and evaluation
    (chosen, rejected, their margin and the share of pairs ranked right)."""

    def rows(prefix: str) -> list[dict[str, Any]]:
        return [
            {"step": e["step"]} | {name: e[f"{prefix}rewards/{name}"] for name in REWARDS}
            for e in state.log_history
            if f"{prefix}rewards/margins" in e and "step" in e
        ]

    evals = rows("eval_")
    return {
        "rewards": rows(""),
        "eval_rewards": evals,
        "final_val_reward_accuracy": evals[-1]["accuracies"] if evals else None,
        "final_val_reward_margin": evals[-1]["margins"] if evals else None,
    }


def plot_preference(summary: Mapping[str, Any], path: Path) -> None:
    """DPO's loss (train, validation) above its reward margin and accuracy, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (loss_axes, reward_axes) = plt.subplots(2, 1, figsize=(7, 7), dpi=100, sharex=True)
    try:
        train = summary["train_loss"]
        loss_axes.plot([e["step"] for e in train], [e["loss"] for e in train], label="train")
        if summary["eval_loss"]:
            evals = summary["eval_loss"]
            loss_axes.plot([e["step"] for e in evals], [e["loss"] for e in evals], marker="o",
                           label="validation")  # fmt: skip
        loss_axes.set_ylabel("DPO loss")
        loss_axes.set_title("DPO loss and rewards")
        loss_axes.legend()
        accuracy_axes = reward_axes.twinx()
        for key, style, label in (("rewards", "-", "train"), ("eval_rewards", "o--", "val")):
            rows = summary[key]
            if not rows:
                continue
            steps = [e["step"] for e in rows]
            reward_axes.plot(steps, [e["margins"] for e in rows], style, color="tab:blue",
                             label=f"margin ({label})")  # fmt: skip
            accuracy_axes.plot(steps, [e["accuracies"] for e in rows], style, color="tab:orange",
                               label=f"accuracy ({label})")  # fmt: skip
        reward_axes.set_xlabel("step")
        reward_axes.set_ylabel("reward margin (chosen - rejected)")
        accuracy_axes.set_ylabel("reward accuracy")
        accuracy_axes.set_ylim(-0.05, 1.05)
        handles = [h for axes in (reward_axes, accuracy_axes) for h in axes.get_lines()]
        reward_axes.legend(handles=handles, labels=[h.get_label() for h in handles], loc="best")
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)


def _write_json(path: Path, data: Any) -> None:
    """Write via a temporary file and a rename, so a killed run leaves no half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, path)
