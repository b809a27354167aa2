"""QLoRA on the CPU: a 4-bit NF4 base (bitsandbytes) trained through `loraplex train`, whose
evaluations in the middle of the run do not stop the learning, whose adapter passes the serving
gate on the full-precision base, and a clear refusal where bitsandbytes cannot be imported.

Run under the engine lock (it trains on the CPU and starts the real engine for the gate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraplex.hardware import choose_dtype
from registry.service import Registry
from registry.settings import RegistrySettings
from tests.support.adapters import TRAINING_PAIRS

# lr 1e-3 over 16 steps: an adapter that ends its answers on 5 of the 6 gate prompts served by the
# compiled model (2e-3 over 12 steps gave 4 of 6 compiled, 5 of 6 eager: the loops of a barely
# trained adapter follow the last bit of rounding).
STEPS, EVAL_EVERY = 16, 4


def chat_rows(pairs: tuple[tuple[str, str], ...]) -> str:
    return "".join(
        json.dumps({"messages": [{"role": "user", "content": q},
                                 {"role": "assistant", "content": a.upper()}]}) + "\n"
        for q, a in pairs
    )  # fmt: skip


def registry_flags(home: Path) -> list[str]:
    return ["--home", str(home), "--registry", f"sqlite:///{home / 'registry.db'}",
            "--artifacts", (home / "artifacts").as_uri(), "--actor", "tester"]  # fmt: skip


def test_qlora_on_the_cpu_keeps_learning_through_its_evaluations_and_passes_the_gate(
    tmp_path: Path, embedded_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bitsandbytes' CPU probe is made to say AVX512-BF16 (on an AVX2-only CPU it says no), so
    the 4-bit layers are built as on such a CPU, where an eval-mode forward repacks their weights
    for a kernel without autograd (the next test checks that mechanism). The run must keep
    learning after each evaluation (steps 4 and 8), pass the serving gate (the adapter served
    by the real engine on the full-precision base) and record its quantization.
    """
    import bitsandbytes.nn.modules as bnb_modules
    import typer

    from trainer.train_cli import train as train_command

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    app = typer.Typer()
    app.command("train")(train_command)
    app.command("noop")(lambda: None)
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text(chat_rows(TRAINING_PAIRS[:32]))
    val.write_text(chat_rows(TRAINING_PAIRS[32:40]))
    home, out = tmp_path / "home", tmp_path / "run"
    args = ["train", "--method", "qlora", "--data", str(train), "--val", str(val),
            "--name", "shout-4bit", "--out", str(out), "--model", str(embedded_model_dir),
            "--lr", "1e-3", "--schedule", "constant", "--max-steps", str(STEPS),
            "--batch-size", "8", "--max-seq-len", "128", "--eval-every", str(EVAL_EVERY),
            "--seed", "7", "--register", "--json", *registry_flags(home)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + str(result.exception)

    metrics = json.loads((out / "metrics.json").read_text())
    train_loss = [e["loss"] for e in metrics["train_loss"]]
    evals = [e["loss"] for e in metrics["eval_loss"]]
    assert [e["step"] for e in metrics["eval_loss"]] == [4, 8, 12, 16]
    windows = [sum(train_loss[i : i + 4]) / 4 for i in (0, 4, 8)]  # before, between, after
    assert windows[0] > windows[1] > windows[2], (windows, train_loss)
    assert evals[0] > evals[1] > evals[2], evals  # each evaluation sees a better model
    assert train_loss[-1] < 0.5 * train_loss[0], train_loss

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "qlora" and manifest["hyperparameters"]["method"] == "qlora"
    quantization = manifest["quantization"]
    assert quantization["library"] == "bitsandbytes" and quantization["bits"] == 4
    assert quantization["quant_type"] == "nf4" and quantization["double_quant"] is True
    # The 4-bit layers compute in the dtype chosen for this CPU (fp32 on AVX2, bf16 where native).
    assert quantization["compute_dtype"] == manifest["dtype"] == choose_dtype("auto").dtype
    assert quantization["version"] == "0.50.2"
    gate = manifest["serving_gate"]
    assert gate["passed"] and gate["accepted"] and gate["changed_share"] > 0, gate["problems"]
    settings = RegistrySettings(home=home, registry=f"sqlite:///{home / 'registry.db'}",
                                artifacts=(home / "artifacts").as_uri())  # fmt: skip
    with Registry.open(settings) as registry:
        version = registry.store.resolve("shout-4bit@1")
    assert dict(version.lineage) == manifest


def test_qlora_is_refused_before_any_work_where_bitsandbytes_fails_to_import(
    tmp_path: Path,
) -> None:
    """A bitsandbytes whose import fails (as a build without its native library does): exit 2
    with the reason and the way out, before the data is even read."""
    broken = tmp_path / "site" / "bitsandbytes"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        'raise OSError("libbitsandbytes_cpu.so: cannot open shared object file")\n'
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.getcwd()])}
    out = tmp_path / "run"
    command = [sys.executable, "-m", "loraplex.cli", "train", "--method", "qlora",
               "--data", str(tmp_path / "missing.jsonl"), "--name", "x", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert (
        "error: QLoRA needs bitsandbytes for its 4-bit base (it fails to import: OSError: "
        "libbitsandbytes_cpu.so" in done.stderr
    ), done.stderr
    assert "use --method lora" in done.stderr
    assert not out.exists()


def test_an_evaluation_leaves_the_4bit_layers_on_their_trainable_path(
    embedded_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mechanism itself: with bitsandbytes' probe saying AVX512-BF16, an eval-mode forward
    without grad (what every evaluation is) would repack all 4-bit layers for the inference
    kernel (without trainer.sft's fix: 210 of 210 here). The trainer's base stays unpacked."""
    import bitsandbytes.nn.modules as bnb_modules
    import torch
    from bitsandbytes.nn import Linear4bit

    from trainer.sft import _load_model

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model = _load_model(embedded_model_dir, "qlora", "float32")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 210
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5, 6]]))
    packed = [m for m in layers if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    assert not packed, f"{len(packed)} of {len(layers)} 4-bit layers were repacked"
