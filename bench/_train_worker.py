"""One training run of one system, in its own process: `python -m bench._train_worker SPEC.json`.

Systems: `loraplex` (the `loraplex train` command itself, run here through its typer app),
`trl` (TRL's SFTTrainer with its defaults, given only the shared settings) and `peft` (a plain
torch loop over a peft model). Each trains the same examples with the same LoRA, batch size,
steps, learning rate, maximum length and seed, and reports the non-padding input tokens it
processed and the seconds of its training call (model loading and tokenizing excluded), as one
JSON line on stdout. Peak RSS is measured by the parent (bench/train.py) from the process's own
rusage, so it is this process's alone.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SYSTEMS = ("loraplex", "trl", "peft")


def _chats(data: Path) -> list[list[dict[str, str]]]:
    lines = data.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["messages"] for line in lines if line.strip()]


def run_loraplex(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """`loraplex train` as a user runs it; its metrics.json counts non-padding input tokens
    (the trainer's num_input_tokens_seen) over the wall time of the training call."""
    import typer
    from typer.testing import CliRunner

    from trainer.train_cli import train

    app = typer.Typer()
    app.command("train")(train)
    app.command("noop")(lambda: None)
    lora = spec["lora"]
    out = work / "run"
    args = ["train", "--data", spec["data"], "--name", "bench", "--out", str(out),
            "--model", spec["model"], "--max-steps", str(spec["steps"]),
            "--batch-size", str(spec["batch_size"]), "--max-seq-len", str(spec["max_seq_len"]),
            "--lr", str(spec["lr"]), "--seed", str(spec["seed"]), "--rank", str(lora["rank"]),
            "--alpha", str(lora["alpha"]), "--dropout", str(lora["dropout"]),
            "--target-modules", ",".join(lora["target_modules"]), "--dtype", spec["dtype"],
            "--home", str(work / "home"), "--no-gate", "--json", *spec.get("extra", [])]  # fmt: skip
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise RuntimeError(f"loraplex train failed: {result.output}{result.exception!r}")
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    return {"tokens": metrics["tokens_trained"], "seconds": metrics["wall_seconds"],
            "steps": metrics["steps"], "dtype": manifest["dtype"],
            "final_train_loss": metrics["final_train_loss"]}  # fmt: skip


def run_trl(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """SFTTrainer with its defaults (bf16 autocast, gradient checkpointing, fused AdamW, loss on
    every token), given only the settings all systems share."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    lora = spec["lora"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    dataset = Dataset.from_list([{"messages": chat} for chat in _chats(Path(spec["data"]))])
    config = SFTConfig(
        output_dir=str(work / "trl"), max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"], learning_rate=spec["lr"],
        max_length=spec["max_seq_len"], seed=spec["seed"], use_cpu=not torch.cuda.is_available(),
        bf16=spec["dtype"] == "bfloat16", report_to="none", disable_tqdm=True,
        include_num_input_tokens_seen="non_padding", **spec.get("trl_overrides", {}),
    )  # fmt: skip
    peft_config = LoraConfig(
        r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=peft_config)  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"tokens": int(trainer.state.num_input_tokens_seen), "seconds": round(seconds, 2),
            "steps": trainer.state.global_step, "dtype": spec["dtype"],
            "gradient_checkpointing": config.gradient_checkpointing,
            "final_train_loss": losses[-1] if losses else None}  # fmt: skip


def run_peft(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """A plain loop: the chat template's text, right-padded batches in a seeded order, AdamW,
    bf16 autocast where that is the dtype, loss on every token."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora = spec["lora"]
    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    base = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(
        r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM",
    ))  # fmt: skip
    model.train()
    rows = [tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"]
            for chat in _chats(Path(spec["data"]))]  # fmt: skip
    rows = [ids[: spec["max_seq_len"]] for ids in rows]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=spec["lr"])  # fmt: skip
    order: list[int] = []
    shuffle = random.Random(spec["seed"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bf16 = spec["dtype"] == "bfloat16"
    tokens, loss = 0, None
    started = time.perf_counter()
    for _step in range(spec["steps"]):
        if len(order) < spec["batch_size"]:
            order += shuffle.sample(range(len(rows)), len(rows))
        batch = [rows[i] for i in order[: spec["batch_size"]]]
        del order[: spec["batch_size"]]
        width = max(map(len, batch))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in batch])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch])
        labels = ids.masked_fill(mask == 0, -100)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(seconds, 2), "steps": spec["steps"],
            "dtype": spec["dtype"], "final_train_loss": float(loss) if loss is not None else None}  # fmt: skip


RUNNERS = {"loraplex": run_loraplex, "trl": run_trl, "peft": run_peft}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    with tempfile.TemporaryDirectory(prefix=f"bench-train-{spec['system']}-") as tmp:
        figures = RUNNERS[spec["system"]](spec, Path(tmp))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
